"""Measure what a rank really holds under DeepSpeed: parameter shards, gradients, master weights, optimizer state."""

from __future__ import annotations

import torch


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def measure_model_states(engine) -> dict:
    """Per-rank bytes read from the engine (not assumed), plus full vs local parameter element counts."""
    params = list(engine.module.parameters())
    local = [getattr(p, "ds_tensor", p) for p in params]
    optimizer = engine.optimizer
    master = list(getattr(optimizer, "fp32_partitioned_groups_flat", None)
                  or getattr(optimizer, "single_partition_of_fp32_groups", None) or [])
    grads = getattr(optimizer, "grad_partitions_flat_buffer", None)
    inner = getattr(optimizer, "optimizer", optimizer)
    state = [t for s in inner.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    report = {
        "param_numel_full": sum(getattr(p, "ds_numel", p.numel()) for p in params),
        "param_numel_local": sum(t.numel() for t in local),
        "param_bytes": _bytes(local),
        "grad_bytes": _bytes([grads]) if grads is not None else _bytes([p.grad for p in params]),
        "master_bytes": _bytes(master),
        "optimizer_state_numel": sum(t.numel() for t in state),
        "optimizer_state_bytes": _bytes(state),
        "master_numel": sum(t.numel() for t in master),
    }
    report["model_state_bytes"] = (report["param_bytes"] + report["grad_bytes"] + report["master_bytes"]
                                   + report["optimizer_state_bytes"])
    return report
