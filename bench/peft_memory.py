"""Weights in fp32 / bf16 / 8-bit / 4-bit, trainable share per method, and QLoRA step time vs bf16 LoRA.

Model: the real SmolLM2-135M-Instruct (the `small` profile). Goal: 4-bit weights at most 30% of bf16
(measured on the layers bitsandbytes quantises, and reported for the whole model, whose tied
embedding stays 16-bit).
"""

from __future__ import annotations

import time

import torch

METHODS = ["lora", "dora", "qlora", "lora8bit", "prefix", "prompt", "ptuning", "ia3", "llama_adapter", "adapter"]
STEPS = 4


def load(dtype: str, bits=None):
    from ftl.config.schema import ModelConfig, QuantOptions
    from ftl.models.load import load_model, pretrained_dir

    cfg = ModelConfig(source="smollm2", dtype=dtype)
    return load_model(cfg, pretrained_dir(cfg), bits, QuantOptions(compute_dtype=dtype))


def step_seconds(model, batch) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    times = []
    for _ in range(STEPS + 1):
        start = time.perf_counter()
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[len(times[1:]) // 2]  # median, first step excluded


def main() -> dict:
    from ftl.config.schema import MethodConfig
    from ftl.methods import METHODS as METHOD_TABLE, apply_method, trainable_summary
    from ftl.models.quantize import linear_weight_bytes, weight_bytes

    memory = {}
    for label, dtype, bits in (("fp32", "float32", None), ("bf16", "bfloat16", None), ("8-bit", "bfloat16", 8),
                               ("4-bit nf4", "bfloat16", 4)):
        model = load(dtype, bits)
        memory[label] = {"model_bytes": weight_bytes(model), "linear_bytes": linear_weight_bytes(model)}
        del model
    shares = {}
    for kind in METHODS:
        method = MethodConfig(kind=kind)
        model = apply_method(load("float32", METHOD_TABLE[kind].quant_bits), method)
        shares[kind] = trainable_summary(model)
        del model
    torch.manual_seed(0)
    ids = torch.randint(0, 49152, (2, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lora = apply_method(load("bfloat16"), MethodConfig(kind="lora"))
    qlora = apply_method(load("bfloat16", 4), MethodConfig(kind="qlora"))
    lora_s, qlora_s = step_seconds(lora, batch), step_seconds(qlora, batch)
    return {"name": "peft_memory", "model": "SmolLM2-135M-Instruct", "weights": memory,
            "four_bit_share_of_bf16": {
                "quantised_linear_layers": memory["4-bit nf4"]["linear_bytes"] / memory["bf16"]["linear_bytes"],
                "whole_model": memory["4-bit nf4"]["model_bytes"] / memory["bf16"]["model_bytes"]},
            "trainable": shares, "step_seconds": {"lora_bf16": lora_s, "qlora_nf4_bf16_compute": qlora_s},
            "qlora_vs_lora_step_time": qlora_s / lora_s, "goal": "4-bit weights <= 30% of bf16"}
