"""Peak memory and step time of one SFT training step, plain loss vs chunked loss (train.loss_chunk_tokens).

Model: the real SmolLM2-135M-Instruct (49,152-token vocabulary, head tied to the embeddings), fp32, full
fine-tuning with AdamW, batch 8 x 512 tokens, every position counted (the chunked loss's worst case: it
computes logits only where a label counts). Each configuration runs in a process of its own; its peak is
the process's resident-set high-water mark (VmHWM), and `step_bytes` is that peak minus the resident set just
before the step (model loaded, optimizer built). Two steps each: the first creates AdamW's state, the second
is timed alone as well. Also with activation checkpointing of the decoder layers (model.gradient_checkpointing),
where the body's activations shrink and the logits are most of what a step adds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

BATCH, LENGTH = 8, 512
CONFIGS = {"plain": (0, False), "chunk_4096": (4096, False), "chunk_1024": (1024, False), "chunk_256": (256, False),
           "plain_gc": (0, True), "chunk_1024_gc": (1024, True)}  # (train.loss_chunk_tokens, gradient checkpointing)


def one(chunk_tokens: int, checkpointing: bool) -> dict:
    import psutil
    import torch

    from ftl.config.schema import ModelConfig
    from ftl.evaluate.lm import causal_lm_loss
    from ftl.models.load import load_model, pretrained_dir
    from ftl.track.memory import peak_rss_bytes

    torch.manual_seed(0)
    cfg = ModelConfig(source="smollm2", dtype="float32", gradient_checkpointing=checkpointing)
    model = load_model(cfg, pretrained_dir(cfg)).train()
    vocab = model.config.vocab_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, vocab, (BATCH, LENGTH))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    before = psutil.Process().memory_info().rss
    seconds, losses = [], []
    for _ in range(2):
        started = time.perf_counter()
        loss, _ = causal_lm_loss(model, batch, chunk_tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - started)
        losses.append(loss.item())
    peak = peak_rss_bytes()  # VmHWM: ru_maxrss would count a large parent's size
    return {"chunk_tokens": chunk_tokens, "gradient_checkpointing": checkpointing, "peak_rss_bytes": peak, "rss_before_step_bytes": before,
            "step_bytes": peak - before, "step_seconds": seconds, "losses": losses,
            "model_params": sum(p.numel() for p in model.parameters()), "vocab_size": vocab,
            "torch_threads": torch.get_num_threads()}


def main() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1"}
    runs = {}
    for name, (chunk, checkpointing) in CONFIGS.items():
        proc = subprocess.run([sys.executable, __file__, str(chunk), str(int(checkpointing))], env=env, capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(f"loss_memory {name} failed:\n{proc.stderr[-3000:]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, default = runs["plain"], runs["chunk_1024"]
    plain_gc, default_gc = runs["plain_gc"], runs["chunk_1024_gc"]
    return {"name": "loss_memory", "model": "SmolLM2-135M-Instruct", "batch": [BATCH, LENGTH], "dtype": "float32",
            "runs": runs,
            "logits_bytes_fp32": BATCH * LENGTH * plain["vocab_size"] * 4,
            "default_chunk_tokens": 1024,
            "peak_ratio_chunked_vs_plain": default["peak_rss_bytes"] / plain["peak_rss_bytes"],
            "step_bytes_ratio_chunked_vs_plain": default["step_bytes"] / plain["step_bytes"],
            "second_step_time_ratio_chunked_vs_plain": default["step_seconds"][1] / plain["step_seconds"][1],
            "with_gradient_checkpointing": {
                "peak_ratio_chunked_vs_plain": default_gc["peak_rss_bytes"] / plain_gc["peak_rss_bytes"],
                "step_bytes_ratio_chunked_vs_plain": default_gc["step_bytes"] / plain_gc["step_bytes"],
                "second_step_time_ratio_chunked_vs_plain": default_gc["step_seconds"][1] / plain_gc["step_seconds"][1]},
            "max_loss_difference": max(abs(a - b) for r in runs.values() for a, b in zip(r["losses"], plain["losses"]))}


if __name__ == "__main__":
    sys.stdout.write(json.dumps(one(int(sys.argv[1]), bool(int(sys.argv[2])))) + "\n")
