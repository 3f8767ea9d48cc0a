"""Training methods: each module turns a loaded model into what trains (one job each).

`METHODS` is the one table of methods: what applies each, and everything the other layers ask of a
method (quantised base, packing, merge, memory planning, PPO's reference). A method missing a column
fails at import (every field is required). `apply_method(model, cfg)` returns the model to train;
`trainable_summary` counts what it updates; `save_trained` / `load_trained` write and read what a
method produced (an adapter alone when the base stays frozen).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import torch

from ftl.config.schema import MethodConfig
from ftl.methods import bottleneck, full, lora, prompt_learning, qat


@dataclass(frozen=True)
class MethodInfo:
    apply: Callable                  # (model, MethodConfig, gradient_checkpointing, task_type) -> model to train
    quant_bits: Optional[int]        # the frozen base loads quantised by bitsandbytes (4, 8) or not (None)
    packs: bool                      # False: virtual tokens at the start of each row forbid packed rows
    mergeable: bool                  # `ftl merge` can fold what it trains into the base
    plan_family: Literal["full", "lora", "qlora"]  # memory model `ftl plan` uses
    disabled_adapter_reference: bool  # PPO's reference is this model with its adapter off (no second copy)


# prefix/prompt/p-tuning/LLaMA-Adapter put learned tokens at the start of a row: a packed row would share
# them across examples. IA3 merges but scales activations (disable_adapter is not its reference in PPO).
METHODS: dict[str, MethodInfo] = {
    "full": MethodInfo(full.apply, None, True, False, "full", False),
    "lora": MethodInfo(lora.apply, None, True, True, "lora", True),
    "dora": MethodInfo(lora.apply, None, True, True, "lora", True),
    "qlora": MethodInfo(lora.apply, 4, True, True, "qlora", True),
    "lora8bit": MethodInfo(lora.apply, 8, True, True, "lora", True),
    "prefix": MethodInfo(prompt_learning.apply, None, False, False, "lora", False),
    "prompt": MethodInfo(prompt_learning.apply, None, False, False, "lora", False),
    "ptuning": MethodInfo(prompt_learning.apply, None, False, False, "lora", False),
    "ia3": MethodInfo(prompt_learning.apply, None, True, True, "lora", False),
    "llama_adapter": MethodInfo(prompt_learning.apply, None, False, False, "lora", False),
    "adapter": MethodInfo(bottleneck.apply, None, True, False, "lora", False),
}


def method_info(kind: str) -> MethodInfo:
    return METHODS[kind]


# stages whose every training forward runs under the run's autocast (session.training_autocast_dtype): plain
# LoRA there keeps its frozen linears in bf16 at train.precision bf16
STORES_FROZEN_16BIT = ("sft", "ppo")


def apply_method(model, cfg: MethodConfig, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM",
                 autocast_dtype: Optional[str] = None):
    """autocast_dtype: "bfloat16" when every forward that trains runs under bf16 autocast (the caller knows: an
    SFT or PPO stage, STORES_FROZEN_16BIT, at train.precision bf16 without DeepSpeed); LoRA then keeps its frozen
    linear weights in bf16, exactly the values autocast would compute with (methods/lora.py:
    store_frozen_linears_16bit)."""
    model = METHODS[cfg.kind].apply(model, cfg, gradient_checkpointing=gradient_checkpointing, task_type=task_type)
    if cfg.qat.enabled:  # fake-quantised linear layers while training (torchao); see methods/qat.py
        model = qat.prepare(model, cfg)
    elif cfg.kind == "lora" and autocast_dtype == "bfloat16":
        lora.store_frozen_linears_16bit(model, torch.bfloat16)
        from ftl.track.memory import release_freed_memory

        release_freed_memory()  # the fp32 weights just dropped
    return model


def trainable_summary(model) -> dict:
    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total if total else 0.0}


def count(param) -> int:
    """Logical parameter count: ZeRO-3 shards report 0 locally, packed 4-bit weights half."""
    if hasattr(param, "ds_numel"):
        return param.ds_numel
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def save_trained(model, state_dict: dict, target: Path, cfg: MethodConfig) -> None:
    """model is unwrapped; state_dict is the full (ZeRO-gathered) state."""
    if cfg.kind == "adapter":
        bottleneck.save_adapter(model, state_dict, target, cfg.adapter)
    else:  # PEFT saves its adapter only; full fine-tuning saves the whole model
        model.save_pretrained(target, state_dict=state_dict)


def load_trained(base_model, source: Path, cfg: MethodConfig):
    if cfg.kind == "adapter":
        return bottleneck.load_adapter(base_model, source)
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, source)
