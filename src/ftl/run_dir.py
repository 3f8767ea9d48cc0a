"""The run directory: where a run writes everything, and what it holds. Every name in it is here."""

from __future__ import annotations

from pathlib import Path

from ftl.config.schema import Recipe


def run_dir_for(recipe: Recipe) -> Path:
    return Path(recipe.track.output_dir.format(name=recipe.name, profile=recipe.profile or "base"))


RECIPE_FILE = "recipe.yaml"         # the resolved recipe (profile and overrides applied)
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"             # before/after evaluation (evaluate.report)
EVAL_BEFORE_FILE = "eval_before.json"  # the untrained model's evaluation (eval.before_training)
PLOT_FILE = "curves.png"
FINAL_DIR = "final"                 # the trained model (or adapter), a save_pretrained folder
TOKENIZER_DIR = "tokenizer"
BASE_DIR = "base"                   # a tiny model's base weights, built once per run
CHECKPOINTS_DIR = "checkpoints"     # step-NNNNNNN folders (ftl's loop)
TRL_DIR = "trl"                     # TRL-backed stages' own checkpoints
BEST_DIR = "best"                   # early stopping: the best epoch's model
WANDB_DIR = "wandb"
MERGED_DIR = "merged"               # `ftl merge`: adapter folded into its base
LABELS_FILE = "labels.json"         # classify: label names in id order
UPFT_SAMPLES_FILE = "upft_samples.jsonl"
UPFT_META_FILE = "upft_samples.meta.json"
QUANTIZED_DIR = "quantized"         # QAT: the really quantised model
QAT_BASELINE_DIR = "ptq_baseline"   # QAT: the plain fine-tune that is post-training quantised
QAT_REPORT = "qat"                  # qat.json / qat.md
PARTIAL_SUFFIX = ".partial"         # a folder or file being written; renamed into place when complete

# What a fresh run in a used folder replaces (the files are rewritten as it goes).
RUN_OUTPUTS = (CHECKPOINTS_DIR, FINAL_DIR, TOKENIZER_DIR, BASE_DIR, WANDB_DIR, BEST_DIR, TRL_DIR)


def partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)
