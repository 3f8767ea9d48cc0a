"""The run directory: where a run writes everything, and what it holds."""

from __future__ import annotations

from pathlib import Path

from ftl.config.schema import Recipe


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.track.output_dir.format(name=recipe.name, profile=recipe.profile or "base"))


RECIPE_FILE = "recipe.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"           # before/after evaluation (evaluate.report)
FINAL_DIR = "final"
TOKENIZER_DIR = "tokenizer"
PLOT_FILE = "curves.png"
