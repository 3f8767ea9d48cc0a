"""Training methods: each module turns a loaded model into what trains (one job each).

`apply_method(model, cfg)` returns the model to train; `trainable_summary` counts what it updates.
"""

from __future__ import annotations

from ftl.config.schema import MethodConfig
from ftl.methods import full, lora

METHODS = {"full": full.apply, "lora": lora.apply}


def apply_method(model, cfg: MethodConfig):
    return METHODS[cfg.kind](model, cfg)


def trainable_summary(model) -> dict:
    count = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 shards report 0 locally
    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return {"trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total if total else 0.0}
