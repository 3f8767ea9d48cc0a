"""Frozen models under DeepSpeed ZeRO-3: partitioned like the trained engine, each in an inference engine of
its own (`deepspeed.initialize` with the run's ZeRO-3 config and no optimizer, the way TRL's
`prepare_deepspeed` held PPO's reference and reward models).

A model loaded under ZeRO-3 (accelerate's zero3_init_flag) holds only its shard of every parameter; the
engine installs the hooks that gather a submodule's weights for its forward and release them after, so
the model is called as usual (`engine.module(...)`, `generate`, a head called as a module) and every call
is a collective all ranks join — the same rule as for the trained engine. Nothing here trains: no
optimizer, no gradients, never saved or checkpointed.
"""

from __future__ import annotations

import copy

# "auto" values accelerate fills for the trained engine from the model's hidden size (TRL's prepare_deepspeed
# used the same): buckets and the threshold below which a parameter stays whole on every rank
HIDDEN_SIZE_AUTOS = {"reduce_bucket_size": lambda h: h * h,
                     "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
                     "stage3_param_persistence_threshold": lambda h: 10 * h}


def inference_config(accelerator, hidden_size: int) -> dict:
    """The run's ZeRO-3 config for a frozen model: no optimizer (nor its offload or scheduler), every "auto"
    resolved (accelerate resolves the trained engine's in place at prepare; what it left is filled here)."""
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    for key, value in HIDDEN_SIZE_AUTOS.items():
        if zero.get(key) == "auto":
            zero[key] = value(hidden_size)
    batch = config.get("train_micro_batch_size_per_gpu")
    batch = 1 if batch in (None, "auto") else batch
    accum = config.get("gradient_accumulation_steps")
    accum = 1 if accum in (None, "auto") else accum
    config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"] = batch, accum
    config["train_batch_size"] = batch * accum * accelerator.num_processes
    if config.get("gradient_clipping") == "auto":
        config["gradient_clipping"] = 0.0
    for dtype, precision in (("bf16", "bf16"), ("fp16", "fp16")):
        section = config.get(dtype)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            section["enabled"] = accelerator.mixed_precision == precision
    return config


def frozen_zero3_model(accelerator, model):
    """`model` (loaded under ZeRO-3, frozen) in an inference engine of its own; returns the engine's module,
    called like the model itself (the engine stays reachable as its `ftl_engine`)."""
    import deepspeed

    model.eval().requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config=inference_config(accelerator, model.config.hidden_size))
    engine.eval()
    module = engine.module
    # keeps the engine (its parameter coordinator) alive with the model; not as a submodule (a cycle)
    module.__dict__["ftl_engine"] = engine
    return module


def partition_numel(model) -> dict:
    """Elements of `model`'s parameters this rank holds (`local`: ZeRO-3 shards, padding included) vs in all
    (`full`), read from the parameters themselves."""
    params = list(model.parameters())
    local = sum(getattr(p, "ds_tensor", p).numel() for p in params)
    full = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    return {"local": int(local), "full": int(full)}


def is_partitioned(model) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())
