"""SFT throughput: ftl (packed, no gradient checkpointing) vs TRL SFTTrainer with its defaults.

Same data (chatterbot-corpus English conversations), same ~11M-parameter Llama and tokenizer, same
initial weights, same step count, one process, measured in one run. Throughput counts real
(non-padding) tokens. MFU = 6 * params * tokens/s / measured bf16 matmul peak.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

STEPS, WARMUP = 30, 3
MODEL = {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
         "num_key_value_heads": 2, "vocab_size": 2048}


def matmul_peak_gflops(dtype: torch.dtype, size: int = 1024, repeats: int = 20) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def recipe_dict(out: Path) -> dict:
    return {
        "name": "bench_sft", "stage": "sft",
        "model": {"source": "tiny", "tiny": MODEL},
        "method": {"kind": "full"},
        "data": {"source": {"kind": "chatterbot", "languages": ["english"]}, "format": "chat",
                 "max_length": 256, "packing": True, "split": {"validation": 0.02}},
        "train": {"lr": 1e-3, "max_steps": STEPS, "batch_size": 2, "precision": "bf16", "save_every": None,
                  "scheduler": "constant", "log_every": 1, "keep_checkpoints": 1},
        "eval": {"max_examples": 1, "generate": {"from_validation": 0}},
        "track": {"output_dir": str(out / "ftl"), "plot": False},
    }


def run_ftl(out: Path) -> dict:
    import json

    import yaml

    from ftl.runner import run_recipe

    path = out / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(out)))
    run_recipe(path)
    rows = [json.loads(line) for line in (out / "ftl" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "loss" in r][WARMUP:]
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["step_time"] for r in timed)
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / len(timed),
            "final_loss": rows[-1]["loss"] if "loss" in rows[-1] else timed[-1]["loss"]}


def run_trl(out: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from ftl.config.schema import DataConfig, TinyModelConfig
    from ftl.data import load_splits
    from ftl.models.load import record_texts
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    data = DataConfig.model_validate(recipe_dict(out)["data"])
    train = load_splits(data)[0].train
    tokenizer = train_tiny_tokenizer(record_texts(train), MODEL["vocab_size"])
    model = build_tiny_model(TinyModelConfig(**MODEL), tokenizer, seed=0)

    class Timer(TrainerCallback):
        def __init__(self):
            self.step_times, self.started = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.step_times.append(time.perf_counter() - self.started)

    real_tokens = []

    def counting_collator(collator):
        def collate(examples):
            batch = collator(examples)
            mask = batch.get("attention_mask")
            real_tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
            return batch
        return collate

    config = SFTConfig(output_dir=str(out / "trl"), max_steps=STEPS, use_cpu=True, report_to=[],
                       save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
    timer = Timer()
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(train),
                         processing_class=tokenizer, callbacks=[timer])
    trainer.data_collator = counting_collator(trainer.data_collator)
    trainer.train()
    tokens, seconds = sum(real_tokens[WARMUP:STEPS]), sum(timer.step_times[WARMUP:])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"tokens_per_s": tokens / seconds, "tokens_per_step": tokens / (STEPS - WARMUP),
            "final_loss": losses[-1], "defaults": {"bf16": config.bf16, "packing": config.packing,
                                                   "gradient_checkpointing": config.gradient_checkpointing,
                                                   "per_device_train_batch_size": config.per_device_train_batch_size}}


def main() -> dict:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    params = None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        peak = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
        trl = run_trl(out)
        ftl = run_ftl(out)
        from ftl.config.schema import TinyModelConfig  # noqa: F401 - params from the built model below
        from transformers import AutoModelForCausalLM, LlamaConfig

        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(LlamaConfig(
            **{k: v for k, v in MODEL.items()})).parameters())
    for result in (ftl, trl):
        result["mfu_vs_bf16_peak"] = 6 * params * result["tokens_per_s"] / (peak["bf16"] * 1e9)
    return {"name": "sft_throughput", "model_params": params, "steps": STEPS, "warmup_steps_excluded": WARMUP,
            "matmul_peak_gflops": peak, "ftl": ftl, "trl_sfttrainer_defaults": trl,
            "speedup": ftl["tokens_per_s"] / trl["tokens_per_s"], "goal": "ftl >= 2x TRL defaults"}
