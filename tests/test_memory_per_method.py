"""Peak memory per method, measured: `ftl compare` runs full fine-tuning and LoRA on the same tiny recipe, each
in its own process, and its table's memory column shows LoRA below full.

The tiny model here is widened (hidden 768, MLP 2048, 4 layers: ~25M parameters) so that what full fine-tuning
adds — gradients and AdamW's two moments, 12 bytes per parameter, ~300 MB — stands clear of the ~0.4 GB CPU
runtime both runs share and of the allocator's noise. At the default tiny size (~0.1M parameters) the two peaks
are equal to the MB (the runtime is all there is). The peaks are each run's own resident-set high-water mark
(ftl.track.memory, VmHWM: not inherited from the process that launched it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDE_TINY = ["model.tiny.hidden_size=768", "model.tiny.intermediate_size=2048", "model.tiny.num_hidden_layers=4",
             "model.tiny.num_attention_heads=12", "model.tiny.num_key_value_heads=4"]
MARGIN = 150 * 2**20  # full minus LoRA, bytes: the expected gap is ~300 MB (12 bytes x 25M parameters)


def test_compare_memory_column_orders_lora_below_full(tmp_path):
    out = tmp_path / "compare"
    variants = '{full: ["method.kind=full"], lora: ["method.kind=lora"]}'
    argv = [sys.executable, "-m", "ftl", "compare", str(ROOT / "recipes" / "sft_chat.yaml"), "--profile", "tiny",
            "--out", str(out), *WIDE_TINY, "train.max_steps=3", "train.save_every=null", "eval.max_examples=4",
            "eval.generate.prompts=[]", "eval.generate.from_validation=0", "track.plot=false",
            f"compare.variants={variants}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    peaks = {}
    for name in ("full", "lora"):
        memory = json.loads((out / name / "manifest.json").read_text())["memory"]
        assert memory["measure"].startswith("host RSS high-water")
        peaks[name] = memory["peak_bytes"]
        assert memory["baseline_bytes"] < memory["peak_bytes"]
    assert peaks["lora"] + MARGIN < peaks["full"], peaks

    # the table `ftl compare` prints (and writes to compare.md) carries those peaks in its memory column
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    column = header.index("peak memory (MB)")
    shown = {cells[0]: int(cells[column]) for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert shown == {name: round(peak / 2**20) for name, peak in peaks.items()}
    assert shown["lora"] < shown["full"]
    assert (out / "compare.md").read_text().count("| lora |") == 1
