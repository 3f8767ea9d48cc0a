"""The run directory: where a run writes everything, and what it holds. Every name in it is here."""

from __future__ import annotations

import os
from pathlib import Path

from ftl.config.schema import Recipe
from ftl.errors import RecipeError

PLACEHOLDERS = "{name}, {profile}"  # what track.output_dir may hold


def run_dir_for(recipe: Recipe) -> Path:
    template = recipe.track.output_dir
    try:
        folder = template.format(name=recipe.name, profile=recipe.profile or "base")
    except KeyError as err:
        raise RecipeError(f"track.output_dir '{template}': unknown placeholder {{{err.args[0]}}} "
                          f"(known: {PLACEHOLDERS})") from None
    except (IndexError, ValueError, AttributeError) as err:
        raise RecipeError(f"track.output_dir '{template}': {err} (placeholders are {PLACEHOLDERS}; "
                          "write {{ and }} for a literal brace)") from None
    return Path(os.path.expanduser(folder))


def ensure_run_dir(path: Path) -> Path:
    """Create the run directory (and its parents), or say which folder cannot be created and why."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        cause = f"{existing} is a file, not a folder" if existing and not existing.is_dir() else err.strerror or err
        raise RecipeError(f"track.output_dir: cannot create the run folder {path} ({cause})") from None
    if not os.access(path, os.W_OK):
        raise RecipeError(f"track.output_dir: the run folder {path} is not writable")
    return path


RECIPE_FILE = "recipe.yaml"         # the resolved recipe (profile and overrides applied)
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"             # before/after evaluation (evaluate.report)
EVAL_BEFORE_FILE = "eval_before.json"  # the untrained model's evaluation (eval.before_training)
PLOT_FILE = "curves.png"
RUN_LOG = "run.log"                 # the main process's console output (ftl.console)
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
STALL_STACKS_FILE = "stall-rank{rank}.txt"  # a stalled rank's Python stacks (ftl.train.watchdog)
LOCK_FILE = ".ftl.lock"             # held for a run's life: who runs here (pid, host, start)
CONTRACT_FILE = "resume_contract.json"  # what a --resume may not change (ftl.train.resume_contract)

# What a fresh run in a used folder replaces (the files are rewritten as it goes).
RUN_OUTPUTS = (CHECKPOINTS_DIR, FINAL_DIR, TOKENIZER_DIR, BASE_DIR, WANDB_DIR, BEST_DIR, TRL_DIR)


def partial(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL_SUFFIX)
