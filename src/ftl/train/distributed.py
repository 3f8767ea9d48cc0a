"""Create the Accelerator the recipe asks for, with the CPU traps handled, or refuse a silently wrong launch.

The device is `launch.device` (refused when this machine cannot provide it), never whatever torch finds.
DeepSpeed is used when the recipe names a DeepSpeed JSON (`launch.deepspeed`) or the launcher says so:
`accelerate launch --config_file launch/zero3.yaml` sets ACCELERATE_USE_DEEPSPEED and names the JSON, an
alignment-handbook-style config with the settings inline (`deepspeed_config: {zero_stage: 3, ...}`) passes
them as ACCELERATE_DEEPSPEED_* variables. ftl builds the plugin itself either way, so the same run works
under accelerate, torchrun and the deepspeed launcher, and a run that asked for DeepSpeed never trains as DDP.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftl.config.schema import LaunchConfig, TrainConfig
from ftl.errors import LaunchError
from ftl.launch.command import config_uses_deepspeed
from ftl.train.zero_memory import measure_model_states

PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
INLINE = "the accelerate config's inline deepspeed_config"
# accelerate settings that only the inline style may set: with a DeepSpeed JSON they belong in the JSON
# (accelerate's DeepSpeedPlugin._deepspeed_config_checks); the recipe's train.precision sets mixed_precision
INLINE_ONLY_FIELDS = ("gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
                      "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path",
                      "zero3_save_16bit_model", "mixed_precision")


def expected_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Machine:
    """What this machine offers a rank, read once so the checks below can be driven with a simulated one."""
    cuda_available: bool
    device_count: int
    torch_version: str
    cuda_build: Optional[str]  # torch.version.cuda: None for a CPU-only torch

    @classmethod
    def here(cls) -> "Machine":
        import torch

        available = torch.cuda.is_available()
        return cls(available, torch.cuda.device_count() if available else 0, torch.__version__, torch.version.cuda)


def choose_device(launch: LaunchConfig, machine: Machine) -> str:
    """`launch.device`, or a LaunchError when this machine cannot provide it (never a quiet fallback)."""
    if launch.device == "cpu":
        return "cpu"
    if not machine.cuda_available or machine.device_count == 0:
        why = (f"torch {machine.torch_version} is built without CUDA" if machine.cuda_build is None
               else f"torch {machine.torch_version} sees 0 CUDA devices (check CUDA_VISIBLE_DEVICES)")
        raise LaunchError(f"launch.device is 'cuda' but this machine has no CUDA device ({why}); "
                          "use a CPU profile or set launch.device=cpu")
    if launch.num_processes > machine.device_count:
        raise LaunchError(f"launch.num_processes asks for {launch.num_processes} ranks per machine but this machine "
                          f"has {machine.device_count} visible CUDA device(s): set launch.num_processes to at most "
                          f"{machine.device_count} (one rank per device)")
    return "cuda"


def check_precision(train: TrainConfig, device: str) -> None:
    # accelerate autocasts to fp16 only on accelerators: on CPU an fp16 run would quietly train in fp32
    if train.precision == "fp16" and device == "cpu":
        raise LaunchError("train.precision is 'fp16' but this run is on CPU, where fp16 mixed precision does not run "
                          "(it would train in fp32); use train.precision=bf16 or fp32 on CPU")


def accelerate_wants_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def deepspeed_json_path(launch: LaunchConfig) -> Optional[str]:
    if launch.deepspeed:
        return launch.deepspeed
    if accelerate_wants_deepspeed():
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


def check_inline_agrees_with_recipe(train: TrainConfig) -> None:
    """The recipe decides the batch arithmetic; an accelerate config saying otherwise is refused, not overruled."""
    for field, variable, key, value in (
            ("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "train.grad_accum", train.grad_accum),
            ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING", "train.grad_clip", train.grad_clip or 0.0)):
        given = os.environ.get(variable, "auto")
        if given != "auto" and float(given) != float(value):
            raise LaunchError(f"{INLINE} sets {field}: {given} but the recipe's {key} is {value}: remove "
                              f"{field} from the accelerate config (ftl takes it from the recipe) or set {key}={given}")


def new_plugin(source: str, **settings):
    """accelerate's DeepSpeedPlugin, its ValueErrors turned into errors that say what to change."""
    from accelerate.utils import DeepSpeedPlugin

    try:
        return DeepSpeedPlugin(**settings)
    except ValueError as err:
        if "deepspeed_config_file" in str(err):  # accelerate: a JSON and inline settings together
            raise LaunchError(two_styles_message(source)) from None
        raise LaunchError(f"{source}: accelerate rejects these DeepSpeed settings: {err}") from None


def two_styles_message(json_path: str) -> str:
    fields = os.environ.get("ACCELERATE_CONFIG_DS_FIELDS", "").split(",")
    inline = ", ".join(f for f in fields if f in INLINE_ONLY_FIELDS)
    return (f"DeepSpeed is configured in two styles at once: the JSON {json_path} and, in the accelerate config "
            f"(launch.config_file), the inline settings {inline}. Use one: either keep the JSON (launch.deepspeed "
            "or deepspeed_config_file) and move those settings into it, leaving only deepspeed_config_file and "
            "zero3_init_flag under the accelerate config's deepspeed_config (precision comes from "
            "train.precision), or drop the JSON and keep the inline settings")


def deepspeed_plugin(train: TrainConfig, launch: LaunchConfig):
    """(the DeepSpeedPlugin this run asked for, where its settings come from), or (None, None) for DDP."""
    path = deepspeed_json_path(launch)
    if path:
        config = load_deepspeed_config(path, train)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        return new_plugin(path, hf_ds_config=config, zero3_init_flag=stage == 3), path
    if accelerate_wants_deepspeed():
        # accelerate's DeepSpeedPlugin reads zero stage, offload, zero3_init_flag and the 16-bit save flag
        # from the ACCELERATE_DEEPSPEED_* variables the launcher set; the batch arithmetic comes from the recipe
        check_inline_agrees_with_recipe(train)
        plugin = new_plugin(INLINE, gradient_accumulation_steps=train.grad_accum,
                            gradient_clipping=train.grad_clip or 0.0)
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train.batch_size
        return plugin, INLINE
    config_file = launch.config_file
    if config_file and Path(config_file).is_file() and config_uses_deepspeed(config_file):
        raise LaunchError(f"launch.config_file {config_file} asks for DeepSpeed but this process was not started "
                          f"by `accelerate launch` with it (launch.launcher is '{launch.launcher}'), so it would "
                          "train as plain DDP: use launch.launcher=accelerate, or name the DeepSpeed JSON in "
                          "launch.deepspeed")
    return None, None


def check_consolidated_save(plugin, source: str) -> None:
    # the final model is saved whole (accelerator.get_state_dict), which ZeRO-3 can only gather with this flag
    zero = plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("stage") == 3 and not zero.get("stage3_gather_16bit_weights_on_model_save"):
        raise LaunchError(f"{source}: ZeRO-3 without stage3_gather_16bit_weights_on_model_save (zero3_save_16bit_model "
                          "in an accelerate config) cannot save the final model ftl writes: set it to true")


def skip_cpu_shm_build() -> None:
    """DeepSpeed compiles a shared-memory op (~38 s cold) on every CPU start; it only serves inference."""
    import importlib

    # not `import deepspeed.comm.torch as m`: deepspeed.comm's own `torch` attribute (the torch
    # library) shadows the submodule there, and the patch would land on torch itself
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def use_deepspeed_cpu_accelerator() -> None:
    """DeepSpeed picks CUDA whenever torch sees it; a launch.device cpu run must not."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    if get_accelerator().device_name() != "cpu":
        set_accelerator(CPU_Accelerator())
    skip_cpu_shm_build()


def make_accelerator(train: TrainConfig, launch: LaunchConfig):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    launched, planned = expected_world_size(), launch.num_processes * launch.num_machines
    if launched != planned:
        raise LaunchError(f"the recipe's launch settings ask for {planned} processes "
                          f"({launch.num_machines} x {launch.num_processes}) but this run has {launched}: "
                          "start it with `ftl launch` (note: `accelerate launch --cpu` starts one process), "
                          "or override launch.num_processes")
    device = choose_device(launch, Machine.here())
    check_precision(train, device)
    kwargs = {"mixed_precision": PRECISION[train.precision], "gradient_accumulation_steps": train.grad_accum}
    plugin, ds_source = deepspeed_plugin(train, launch)
    if plugin:
        check_consolidated_save(plugin, ds_source)
        kwargs["deepspeed_plugin"] = plugin
        if device == "cpu":
            use_deepspeed_cpu_accelerator()
            # without gloo both ranks think they are main, reduce() sums, and rank 1 crashes on save;
            # Accelerator(cpu=True) is no way out: it silently drops DeepSpeed
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
    elif device == "cpu":  # a plain Accelerator() reports one process per rank on CPU: gradients never sync
        kwargs["cpu"] = True
    accelerator = Accelerator(**kwargs)
    if accelerator.num_processes != launched:
        raise LaunchError(f"launched with WORLD_SIZE={launched} but accelerate formed a group of "
                          f"{accelerator.num_processes}: gradients would not synchronise")
    if (plugin or accelerate_wants_deepspeed()) and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise LaunchError(f"the run asks for DeepSpeed ({ds_source or 'ACCELERATE_USE_DEEPSPEED'}) but accelerate "
                          f"set up {accelerator.distributed_type}: refusing to train without it")
    if accelerator.device.type != device:
        raise LaunchError(f"launch.device is '{device}' but accelerate placed this rank on {accelerator.device}: "
                          f"start the ranks with CUDA_VISIBLE_DEVICES= (empty) to keep a CPU run off the GPUs")
    return accelerator


def uses_deepspeed(accelerator) -> bool:
    return getattr(accelerator.state, "deepspeed_plugin", None) is not None


def zero_stage(accelerator) -> int:
    return accelerator.state.deepspeed_plugin.zero_stage if uses_deepspeed(accelerator) else 0


def is_sharded(accelerator) -> bool:
    """True when each rank holds only part of the weights (DeepSpeed ZeRO-3)."""
    return zero_stage(accelerator) == 3


def zero_offload(accelerator, what: str) -> str:
    """Where DeepSpeed keeps `what` ("optimizer" or "param"): none, cpu or nvme (none without DeepSpeed)."""
    if not uses_deepspeed(accelerator):
        return "none"
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    return (zero.get(f"offload_{what}") or {}).get("device") or "none"


def offloads_optimizer(accelerator) -> bool:
    return zero_offload(accelerator, "optimizer") in ("cpu", "nvme")


def describe_runtime(accelerator) -> dict:
    """What this rank really runs, read from the live objects rather than from the recipe."""
    import torch

    device = accelerator.device
    with accelerator.autocast():  # the context the training forward runs in
        autocast = torch.is_autocast_enabled(device.type)
        autocast_dtype = str(torch.get_autocast_dtype(device.type)).removeprefix("torch.") if autocast else None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    runtime = {"device": device.type,
               "device_count": torch.cuda.device_count() if device.type == "cuda" else None,
               "threads": torch.get_num_threads(),
               "world_size": accelerator.num_processes,
               "distributed_type": accelerator.distributed_type.value,
               "backend": torch.distributed.get_backend() if distributed else None,
               "mixed_precision": accelerator.mixed_precision,
               "autocast_dtype": autocast_dtype,
               "deepspeed": uses_deepspeed(accelerator)}
    if runtime["deepspeed"]:
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        # DeepSpeed casts the weights itself (no autocast): its 16-bit switch is the training dtype
        enabled = [name for name in ("bf16", "fp16") if str((config.get(name) or {}).get("enabled")).lower() == "true"]
        runtime.update(zero_stage=zero_stage(accelerator), offload_optimizer=zero_offload(accelerator, "optimizer"),
                       offload_param=zero_offload(accelerator, "param"),
                       deepspeed_dtype=enabled[0] if enabled else "fp32")
    return runtime


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
