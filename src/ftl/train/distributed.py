"""Create the Accelerator with the CPU traps handled, and refuse a silently wrong world size."""

from __future__ import annotations

import os

from ftl.errors import LaunchError

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def expected_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def make_accelerator(precision: str, grad_accum: int):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    kwargs = {"mixed_precision": PRECISION[precision], "gradient_accumulation_steps": grad_accum}
    on_cpu = not torch.cuda.is_available()
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        if on_cpu:  # without gloo both ranks think they are main and rank 1 crashes on save
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif on_cpu:  # a plain Accelerator() reports one process per rank on CPU: gradients never sync
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    expected = expected_world_size()
    if accelerator.num_processes != expected:
        raise LaunchError(f"launched with WORLD_SIZE={expected} but accelerate formed a group of "
                          f"{accelerator.num_processes}: gradients would not synchronise")
    return accelerator


def is_sharded(accelerator) -> bool:
    """True when each rank holds only part of the weights (DeepSpeed ZeRO-3)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def rank_checks(accelerator, model) -> list[dict]:
    """Every rank's world size and a digest of its trainable parameters, gathered on all ranks.

    Replicated training (DDP) must end with identical digests on every rank; a difference means
    gradients did not synchronise.
    """
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    mine = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
            "param_digest": digest.hexdigest()[:16]}
    return gather_object([mine]) if accelerator.num_processes > 1 else [mine]
