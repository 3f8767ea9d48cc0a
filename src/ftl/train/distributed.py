"""Create the Accelerator with the CPU traps handled, and refuse a silently wrong launch.

DeepSpeed is used when the recipe names a DeepSpeed JSON (`launch.deepspeed`) or the launcher says so
(`accelerate launch --config_file launch/zero3.yaml` sets ACCELERATE_USE_DEEPSPEED). ftl builds the
plugin itself either way, so the same run works under accelerate, torchrun and the deepspeed launcher.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ftl.config.schema import LaunchConfig, TrainConfig
from ftl.errors import LaunchError
from ftl.train.zero_memory import measure_model_states

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def expected_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_json_path(launch: LaunchConfig) -> Optional[str]:
    if launch.deepspeed:
        return launch.deepspeed
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or None
    return None


def load_deepspeed_config(path: str, train: TrainConfig) -> dict:
    file = Path(path)
    if not file.is_file():
        raise LaunchError(f"launch.deepspeed: {path} does not exist")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise LaunchError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    config.pop("_comment", None)
    config["train_micro_batch_size_per_gpu"] = train.batch_size
    config["gradient_accumulation_steps"] = train.grad_accum
    config["gradient_clipping"] = train.grad_clip or 0.0
    return config


def skip_cpu_shm_build() -> None:
    """DeepSpeed compiles a shared-memory op (~38 s cold) on every CPU start; it only serves inference."""
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm's own `torch` attribute (the torch
    # library) shadows the submodule there, and the patch would land on torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def make_accelerator(train: TrainConfig, launch: LaunchConfig):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DistributedType, InitProcessGroupKwargs

    launched, planned = expected_world_size(), launch.num_processes * launch.num_machines
    if launched != planned:
        raise LaunchError(f"the recipe's launch settings ask for {planned} processes "
                          f"({launch.num_machines} x {launch.num_processes}) but this run has {launched}: "
                          "start it with `ftl launch` (note: `accelerate launch --cpu` starts one process), "
                          "or override launch.num_processes")
    kwargs = {"mixed_precision": PRECISION[train.precision], "gradient_accumulation_steps": train.grad_accum}
    on_cpu = not torch.cuda.is_available()
    ds_path = deepspeed_json_path(launch)
    if ds_path:
        if on_cpu:
            skip_cpu_shm_build()
        config = load_deepspeed_config(ds_path, train)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=stage == 3)
        if on_cpu:
            # without gloo both ranks think they are main, reduce() sums, and rank 1 crashes on save
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif on_cpu:  # a plain Accelerator() reports one process per rank on CPU: gradients never sync
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched:
        raise LaunchError(f"launched with WORLD_SIZE={launched} but accelerate formed a group of "
                          f"{accelerator.num_processes}: gradients would not synchronise")
    if ds_path and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(f"the recipe asks for DeepSpeed ({ds_path}) but accelerate set up "
                          f"{accelerator.distributed_type}: refusing to train without it")
    return accelerator


def uses_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else 0


def is_sharded(accelerator) -> bool:
    """True when each rank holds only part of the weights (DeepSpeed ZeRO-3)."""
    return zero_stage(accelerator) == 3


def offloads_optimizer(accelerator) -> bool:
    if not uses_deepspeed(accelerator):
        return False
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")


def rank_checks(accelerator, model) -> list[dict]:
    """Every rank's world size, a digest of its trainable weights and, under ZeRO, its shard sizes.

    Replicated training (DDP) must end with identical digests on every rank; a difference means
    gradients did not synchronise. Under ZeRO-3 the digest covers only the rank's own shard.
    """
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, param in accelerator.unwrap_model(model).named_parameters():
        if param.requires_grad:
            local = getattr(param, "ds_tensor", param)
            digest.update(name.encode())
            digest.update(local.detach().float().cpu().numpy().tobytes())
    mine = {"rank": accelerator.process_index, "world_size": accelerator.num_processes,
            "param_digest": digest.hexdigest()[:16]}
    if "SLURM_NODEID" in os.environ:  # which node of a Slurm job this rank ran on
        mine["slurm_node"] = int(os.environ["SLURM_NODEID"])
    if uses_deepspeed(accelerator):
        mine["zero"] = measure_model_states(model)
    return gather_object([mine]) if accelerator.num_processes > 1 else [mine]
