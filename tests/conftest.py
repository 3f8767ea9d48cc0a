"""Shared test helpers: tiny recipes written into a temp folder, subprocess runs, free ports."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def tiny_recipe_dict(run_dir: Path, **sections) -> dict:
    """A small, fast SFT recipe on real chatterbot conversations with the tiny model."""
    recipe = {
        "name": "t",
        "stage": "sft",
        "model": {"source": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                             "num_attention_heads": 4, "num_key_value_heads": 2,
                                             "vocab_size": 400}},
        "method": {"kind": "full"},
        "data": {"source": {"kind": "chatterbot", "languages": ["english"]}, "format": "chat",
                 "max_length": 96, "packing": True, "limit": 600, "split": {"validation": 0.1}},
        "train": {"lr": 1e-2, "max_steps": 16, "batch_size": 4, "warmup_steps": 2, "save_every": 4,
                  "scheduler": "linear"},
        "eval": {"max_examples": 16, "generate": {"from_validation": 1, "max_new_tokens": 4}},
        "track": {"output_dir": str(run_dir), "plot": True},
        "launch": {"main_process_port": free_port()},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def copy_rlhf_pipeline(tmp_path: Path, stages=None, **stage_overrides) -> Path:
    """recipes/rlhf/pipeline.yaml writing into tmp_path/out, optionally only some stages, with overrides."""
    source = RECIPES / "rlhf" / "pipeline.yaml"
    spec = yaml.safe_load(source.read_text())
    spec["output_dir"] = str(tmp_path / "out")
    spec["stages"] = [s for s in spec["stages"] if stages is None or s["name"] in stages]
    for stage in spec["stages"]:
        stage["recipe"] = str(source.parent / stage["recipe"])
        stage["overrides"] = stage_overrides.get(stage["name"], [])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    return env


def ftl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftl", *args]


def run_ftl(*args: str, cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(ftl_command(*args), cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


@pytest.fixture
def tiny_recipe(tmp_path):
    def make(name="recipe.yaml", run_dir=None, **sections) -> Path:
        return write_recipe(tmp_path / name, tiny_recipe_dict(run_dir or tmp_path / "run", **sections))
    return make
