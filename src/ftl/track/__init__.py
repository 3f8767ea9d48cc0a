"""Run tracking: metrics.jsonl, W&B, the manifest and plots. Only the main process writes."""
