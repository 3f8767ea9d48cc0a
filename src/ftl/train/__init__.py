"""The shared training loop on accelerate: batches, steps, checkpoints, signals, logging."""
