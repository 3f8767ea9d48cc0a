"""Peak memory per method, measured: `ftl compare` runs full fine-tuning and LoRA on the same tiny recipe, each
in its own process, and its table's memory column shows LoRA below full.

The tiny model here is widened (hidden 768, MLP 2048, 4 layers: ~25M parameters) so that what full fine-tuning
adds (gradients and AdamW's two moments) stands clear of the ~0.4 GB CPU runtime both runs share and of the
allocator's noise: measured full 1,261 MB vs LoRA 1,148 MB. At the default tiny size (~0.1M parameters) the two peaks
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
MARGIN = 60 * 2**20  # full minus LoRA, bytes: measured 114 MB (1,261 vs 1,148 MB; fp32 recipe, 3 steps)


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
    lines = proc.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    table = [line for line in lines[start:] if line.startswith("|")]
    table = table[: next((i for i, line in enumerate(table) if i > 1 and not line.startswith("| ")), len(table))]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    column = header.index("peak memory (MB)")
    shown = {cells[0]: int(cells[column]) for cells in
             ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert shown == {name: round(peak / 2**20) for name, peak in peaks.items()}
    assert shown["lora"] < shown["full"]
    assert (out / "compare.md").read_text().count("| lora |") == 1


def test_lora_frozen_base_in_bf16_is_exact_under_bf16_autocast():
    """LoRA at train.precision bf16 keeps its frozen linear weights in bf16 (methods/lora.py): under bf16
    autocast the loss and every LoRA gradient are bit-identical to the fp32-stored base, the embeddings and
    the tied head stay fp32, and a forward outside autocast still runs."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftl.config.schema import MethodConfig
    from ftl.methods import apply_method

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    base = AutoModelForCausalLM.from_config(config)
    cfg = MethodConfig(kind="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    torch.manual_seed(1)  # the same LoRA A init in both
    plain = apply_method(copy.deepcopy(base), cfg)
    torch.manual_seed(1)
    stored = apply_method(copy.deepcopy(base), cfg, autocast_dtype="bfloat16")
    for model in (plain, stored):  # the same non-zero adapter in both
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    dtypes = {n: p.dtype for n, p in stored.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.down_proj.weight"] == torch.bfloat16  # not targeted: frozen
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32  # tied to the head: kept
    assert all(p.dtype == torch.float32 for n, p in stored.named_parameters() if p.requires_grad)

    ids = torch.randint(0, 300, (2, 16))
    results = []
    for model in (plain, stored):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert torch.equal(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])
    with torch.no_grad():  # outside autocast (greedy samples from an unwrapped PEFT model): runs, fp32 out
        assert stored(input_ids=ids).logits.dtype == torch.float32
