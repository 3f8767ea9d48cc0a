"""ZeRO-3 per-rank model-state memory, 1 vs 2 ranks, measured from the DeepSpeed engine, and ftl plan's error.

Goal: per-rank model states with 2 ranks within 5% of half of 1 rank; plan within 10% of measured.
Same ~11M-parameter Llama as the throughput bench, fp32 AdamW (CPU), 3 steps, real DeepSpeed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from sft_throughput import MODEL

ROOT = Path(__file__).resolve().parents[1]


def recipe(out: Path, ranks: int, port: int) -> dict:
    return {
        "name": f"zero3_mem_{ranks}", "stage": "sft",
        "model": {"source": "tiny", "tiny": MODEL}, "method": {"kind": "full"},
        "data": {"source": {"kind": "chatterbot", "languages": ["english"]}, "format": "chat",
                 "max_length": 128, "packing": True, "limit": 800},
        "train": {"lr": 1e-3, "max_steps": 3, "batch_size": 1, "save_every": None, "precision": "fp32"},
        "eval": {"max_examples": 2, "generate": {"from_validation": 0}},
        "track": {"output_dir": str(out / f"run{ranks}"), "plot": False},
        "launch": {"num_processes": ranks, "deepspeed": str(ROOT / "launch/ds_zero3.json"),
                   "config_file": str(ROOT / "launch/zero3.yaml"), "main_process_port": port},
    }


def measure(out: Path, ranks: int) -> dict:
    path = out / f"r{ranks}.yaml"
    path.write_text(yaml.safe_dump(recipe(out, ranks, 29600 + ranks)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "ftl", "launch", str(path)], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = json.loads((out / f"run{ranks}" / "manifest.json").read_text())
    from ftl.config import load_recipe
    from ftl.plan import make_plan

    planned = make_plan(load_recipe(path)).chosen.model_states
    per_rank = [c["zero"]["model_state_bytes"] for c in manifest["rank_checks"]]
    return {"ranks": ranks, "measured_bytes_per_rank": per_rank, "planned_bytes_per_rank": planned,
            "plan_error": max(abs(planned - m) / m for m in per_rank),
            "param_numel_local": [c["zero"]["param_numel_local"] for c in manifest["rank_checks"]],
            "param_numel_full": manifest["rank_checks"][0]["zero"]["param_numel_full"]}


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        one, two = measure(Path(tmp), 1), measure(Path(tmp), 2)
    ratio = max(two["measured_bytes_per_rank"]) / one["measured_bytes_per_rank"][0]
    return {"name": "zero3_memory", "one_rank": one, "two_ranks": two, "per_rank_ratio_2_vs_1": ratio,
            "ratio_error_vs_half": abs(ratio - 0.5) / 0.5,
            "max_plan_error": max(one["plan_error"], two["plan_error"]),
            "goals": {"ratio_error_vs_half": "<= 5%", "max_plan_error": "<= 10%"}}
