"""Training methods: each module turns a loaded model into what trains (one job each).

`apply_method(model, cfg)` returns the model to train; `trainable_summary` counts what it updates;
`save_trained` / `load_trained` write and read what a method produced (an adapter alone when the
base stays frozen).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ftl.config.schema import MethodConfig
from ftl.methods import bottleneck, full, lora, prompt_learning

METHODS = {"full": full, "lora": lora, "dora": lora, "qlora": lora, "lora8bit": lora,
           "prefix": prompt_learning, "prompt": prompt_learning, "ptuning": prompt_learning,
           "ia3": prompt_learning, "llama_adapter": prompt_learning, "adapter": bottleneck}
QUANT_BITS = {"qlora": 4, "lora8bit": 8}
# virtual tokens / prefixes sit at the start of a row: a packed row would share them across examples
PACKING_INCOMPATIBLE = {"prefix", "prompt", "ptuning", "llama_adapter"}
MERGEABLE = {"lora", "dora", "qlora", "lora8bit", "ia3"}


def apply_method(model, cfg: MethodConfig, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    model = METHODS[cfg.kind].apply(model, cfg, gradient_checkpointing=gradient_checkpointing, task_type=task_type)
    if cfg.qat.enabled:  # fake-quantised linear layers while training (torchao); see methods/qat.py
        from ftl.methods import qat

        model = qat.prepare(model, cfg)
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
