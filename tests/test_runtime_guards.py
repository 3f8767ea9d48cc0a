"""The device, precision and sharding a run asks for are the ones it gets, or it refuses by name.

Device and precision choices are pure functions driven with a simulated machine; accelerate's DeepSpeed
environment is set here exactly as `accelerate launch` sets it; an alignment-handbook-style accelerate
config (DeepSpeed settings inline, no JSON) runs real ZeRO-3 on 2 gloo ranks.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, free_port, run_ftl, subprocess_env, tiny_recipe_dict, write_recipe
from ftl.config.schema import LaunchConfig, TrainConfig
from ftl.errors import LaunchError
from ftl.train.distributed import (Machine, check_precision, choose_device, deepspeed_plugin, describe_runtime,
                                   make_accelerator)

CPU_ONLY = Machine(cuda_available=False, device_count=0, torch_version="2.13.0+cpu", cuda_build=None)
NO_VISIBLE_GPU = Machine(cuda_available=False, device_count=0, torch_version="2.13.0", cuda_build="12.8")
TWO_GPUS = Machine(cuda_available=True, device_count=2, torch_version="2.13.0", cuda_build="12.8")
ACCELERATE_DEEPSPEED_VARIABLES = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE",
                                  "ACCELERATE_CONFIG_DS_FIELDS", "ACCELERATE_DEEPSPEED_ZERO_STAGE",
                                  "ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "ACCELERATE_GRADIENT_CLIPPING")

# alignment-handbook recipes/accelerate_configs/zero3.yaml: DeepSpeed settings inline, no JSON file
INLINE_ZERO3_YAML = """\
compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_multinode_launcher: standard
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
machine_rank: 0
num_machines: 1
num_processes: 8
rdzv_backend: static
same_network: true
use_cpu: false
"""


@pytest.fixture
def no_accelerate_env(monkeypatch):
    for name in ACCELERATE_DEEPSPEED_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# -- device ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("machine, why", [(CPU_ONLY, "torch 2.13.0+cpu is built without CUDA"),
                                          (NO_VISIBLE_GPU, "sees 0 CUDA devices")])
def test_cuda_asked_on_a_machine_without_cuda_is_refused_by_key(machine, why):
    with pytest.raises(LaunchError) as err:
        choose_device(LaunchConfig(device="cuda"), machine)
    message = str(err.value)
    assert message.startswith("launch.device is 'cuda' but this machine has no CUDA device")
    assert why in message and "launch.device=cpu" in message


def test_more_ranks_per_machine_than_gpus_is_refused():
    assert choose_device(LaunchConfig(device="cuda", num_processes=2), TWO_GPUS) == "cuda"
    with pytest.raises(LaunchError, match=r"launch.num_processes asks for 4 ranks .* has 2 visible CUDA device"):
        choose_device(LaunchConfig(device="cuda", num_processes=4), TWO_GPUS)


def test_cpu_asked_on_a_cuda_machine_stays_on_cpu():
    assert choose_device(LaunchConfig(device="cpu", num_processes=4), TWO_GPUS) == "cpu"


def test_make_accelerator_keeps_a_cpu_run_off_visible_gpus(monkeypatch, fresh_accelerate_state, no_accelerate_env):
    # torch and accelerate are told two GPUs exist: a CPU recipe must still run on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    accelerator = make_accelerator(TrainConfig(), LaunchConfig(device="cpu"))
    assert accelerator.device.type == "cpu"


def test_make_accelerator_refuses_cuda_here(fresh_accelerate_state, no_accelerate_env):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LaunchError, match="launch.device is 'cuda'"):
        make_accelerator(TrainConfig(), LaunchConfig(device="cuda"))


# -- precision ---------------------------------------------------------------------------------------
def test_fp16_on_cpu_is_refused_naming_what_works():
    with pytest.raises(LaunchError) as err:
        check_precision(TrainConfig(precision="fp16"), "cpu")
    assert "train.precision is 'fp16'" in str(err.value) and "bf16 or fp32" in str(err.value)
    check_precision(TrainConfig(precision="fp16"), "cuda")
    for precision in ("bf16", "fp32"):
        check_precision(TrainConfig(precision=precision), "cpu")


class ScriptedLossScaler(torch.optim.SGD):
    """SGD whose update is skipped at the given optimizer steps, as fp16's loss scaler skips a step with
    inf/nan gradients (fp16 mixed precision does not run on CPU)."""

    def __init__(self, params, skip_steps):
        super().__init__(params, lr=0.1)
        self.skip_steps, self.steps, self.step_was_skipped = set(skip_steps), 0, False

    def step(self, closure=None):
        self.steps += 1
        self.step_was_skipped = self.steps in self.skip_steps
        if not self.step_was_skipped:
            super().step(closure)


def test_the_schedule_waits_while_the_loss_scaler_skips_updates(fresh_accelerate_state, no_accelerate_env):
    from accelerate import Accelerator

    from ftl.train.loop import accumulate, build_scheduler, step_record

    class ScalerAccelerator(Accelerator):  # accelerate reads step_was_skipped from a GradScaler on CUDA
        @property
        def optimizer_step_was_skipped(self):
            return any(o.optimizer.step_was_skipped for o in self._optimizers)

    cfg = TrainConfig(lr=0.1, scheduler="linear", grad_accum=2)
    accelerator = ScalerAccelerator(cpu=True, gradient_accumulation_steps=cfg.grad_accum)
    model = torch.nn.Linear(2, 1)
    scaler = ScriptedLossScaler(model.parameters(), skip_steps={2, 3})
    scheduler = build_scheduler(scaler, cfg, total_steps=10)
    model, optimizer = accelerator.prepare(model, scaler)
    batches = iter([(0, [{"input_ids": [1, 2]}], {"x": torch.ones(1, 2)})] * 8)
    loss = lambda m, batch: (m(batch["x"]).pow(2).mean(), 1)  # noqa: E731
    done = [accumulate(accelerator, model, optimizer, scheduler, batches, loss, cfg) for _ in range(4)]
    assert scaler.steps == 4  # one optimizer step per 2 micro-batches
    assert [d.skipped for d in done] == [False, True, True, False]
    assert scheduler.last_epoch == 2  # stepped after the 2 real updates only
    assert scaler.param_groups[0]["lr"] == pytest.approx(0.1 * (1 - 2 / 10))
    assert step_record(accelerator, 2, done[1], 0.1, None, 0.0)["optimizer_step_skipped"] is True
    assert "optimizer_step_skipped" not in step_record(accelerator, 1, done[0], 0.1, None, 0.0)


def test_runtime_of_a_bf16_cpu_accelerator_reads_the_live_autocast(fresh_accelerate_state, no_accelerate_env):
    runtime = describe_runtime(make_accelerator(TrainConfig(precision="bf16"), LaunchConfig()))
    assert runtime == {"device": "cpu", "device_count": None, "threads": torch.get_num_threads(), "world_size": 1,
                       "distributed_type": "NO", "backend": None, "mixed_precision": "bf16",
                       "autocast_dtype": "bfloat16", "deepspeed": False}


def test_runtime_of_an_fp32_cpu_accelerator_has_no_autocast(fresh_accelerate_state, no_accelerate_env):
    runtime = describe_runtime(make_accelerator(TrainConfig(precision="fp32"), LaunchConfig()))
    assert runtime["mixed_precision"] == "no" and runtime["autocast_dtype"] is None


# -- DeepSpeed from accelerate's environment ---------------------------------------------------------
def test_a_json_and_inline_settings_together_name_the_two_styles(no_accelerate_env):
    env = no_accelerate_env
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    # what `accelerate launch` records for a config with both deepspeed_config_file and zero_stage
    env.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,zero_stage,zero3_init_flag")
    with pytest.raises(LaunchError) as err:
        deepspeed_plugin(TrainConfig(), LaunchConfig(deepspeed=str(ROOT / "launch" / "ds_zero3.json")))
    message = str(err.value)
    assert "two styles" in message and "ds_zero3.json" in message
    assert "inline settings zero_stage." in message  # the offending key, not the allowed ones
    assert "drop the JSON and keep the inline settings" in message


def test_inline_settings_that_contradict_the_recipe_are_refused(no_accelerate_env):
    env = no_accelerate_env
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    env.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    with pytest.raises(LaunchError, match=r"gradient_accumulation_steps: 4 but the recipe's train.grad_accum is 1"):
        deepspeed_plugin(TrainConfig(grad_accum=1), LaunchConfig())
    plugin, source = deepspeed_plugin(TrainConfig(grad_accum=4, batch_size=3), LaunchConfig())
    assert "inline" in source and plugin.zero_stage == 3
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 3
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == 4


def test_inline_zero3_without_the_16bit_gather_is_refused_before_training(no_accelerate_env):
    from ftl.train.distributed import check_consolidated_save

    env = no_accelerate_env
    env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    env.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    plugin, source = deepspeed_plugin(TrainConfig(), LaunchConfig())
    with pytest.raises(LaunchError, match="zero3_save_16bit_model"):
        check_consolidated_save(plugin, source)


def test_a_deepspeed_accelerate_config_outside_accelerate_launch_is_refused(tmp_path, no_accelerate_env):
    config = tmp_path / "zero3_inline.yaml"
    config.write_text(INLINE_ZERO3_YAML)
    with pytest.raises(LaunchError, match=r"asks for DeepSpeed but this process was not started by `accelerate "
                                          r"launch`.*launch.launcher is 'torchrun'.*plain DDP"):
        deepspeed_plugin(TrainConfig(), LaunchConfig(config_file=str(config), launcher="torchrun"))


def test_inline_environment_builds_zero3_with_offload_on_gloo():
    """One rank as `accelerate launch` starts it from an inline config (its own process: DeepSpeed initialises
    torch.distributed)."""
    probe = ("import json\n"
             "from ftl.config.schema import LaunchConfig, TrainConfig\n"
             "from ftl.train.distributed import describe_runtime, make_accelerator\n"
             "acc = make_accelerator(TrainConfig(precision='bf16', batch_size=3, grad_accum=2), LaunchConfig())\n"
             "plugin = acc.state.deepspeed_plugin\n"
             "print(json.dumps({'runtime': describe_runtime(acc), 'zero3_init': plugin.zero3_init_flag,\n"
             "                  'micro': plugin.deepspeed_config['train_micro_batch_size_per_gpu']}))\n")
    env = subprocess_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()), ACCELERATE_USE_DEEPSPEED="true",
                         ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu",
                         ACCELERATE_DEEPSPEED_ZERO3_INIT="true", ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true")
    env.pop("ACCELERATE_DEEPSPEED_CONFIG_FILE", None)
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["runtime"] == {"device": "cpu", "device_count": None, "threads": 1, "world_size": 1,
                                 "distributed_type": "DEEPSPEED", "backend": "gloo", "mixed_precision": "bf16",
                                 "autocast_dtype": None, "deepspeed": True, "zero_stage": 3,
                                 "offload_optimizer": "cpu", "offload_param": "none", "deepspeed_dtype": "bf16"}
    assert result["zero3_init"] is True and result["micro"] == 3


@pytest.fixture(scope="module")
def inline_zero3_run(tmp_path_factory):
    """`ftl launch` on 2 gloo ranks with a handbook-style accelerate config: DeepSpeed inline, no JSON."""
    tmp = tmp_path_factory.mktemp("inline_zero3")
    config = tmp / "zero3_inline.yaml"
    config.write_text(INLINE_ZERO3_YAML)
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe_dict(
        tmp / "run", train={"max_steps": 4, "batch_size": 2, "save_every": 4},
        eval={"max_examples": 8, "generate": {"from_validation": 0}},
        launch={"num_processes": 2, "config_file": str(config)}))
    proc = run_ftl("launch", str(recipe), cwd=tmp, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((tmp / "run" / "manifest.json").read_text()), tmp / "run"


@pytest.mark.slow
def test_handbook_style_inline_zero3_config_really_partitions_on_two_ranks(inline_zero3_run):
    manifest, run = inline_zero3_run
    assert manifest["world_size"] == 2
    checks = sorted(manifest["rank_checks"], key=lambda c: c["rank"])
    assert [c["world_size"] for c in checks] == [2, 2]
    full = manifest["trainable"]["total_params"]
    for check in checks:  # ZeRO-3, not DDP: each rank holds half of every parameter
        assert check["zero"]["param_numel_full"] == full
        assert check["zero"]["param_numel_local"] * 2 == full
    assert checks[0]["param_digest"] != checks[1]["param_digest"]
    assert (run / "final" / "model.safetensors").exists()  # the 16-bit gather saved the whole model


@pytest.mark.slow
def test_handbook_style_inline_zero3_run_records_what_ran(inline_zero3_run):
    manifest, _ = inline_zero3_run
    if "runtime" not in manifest:
        pytest.skip("the session does not record describe_runtime in the manifest yet")
    runtime = manifest["runtime"]
    assert (runtime["deepspeed"], runtime["zero_stage"], runtime["backend"], runtime["world_size"]) == \
        (True, 3, "gloo", 2)
    assert (runtime["device"], runtime["offload_optimizer"], runtime["offload_param"]) == ("cpu", "none", "none")
    assert manifest["host_allocator"]["mode"] == "reuse"  # auto on glibc: freed blocks stay for the next step


@pytest.mark.parametrize("precision, device, bf16, fp16, use_cpu", [
    ("fp16", "cuda", False, True, False), ("bf16", "cuda", True, False, False),
    ("fp32", "cuda", False, False, False), ("bf16", "cpu", True, False, True)])
def test_trl_stages_train_in_the_recipes_precision(tmp_path, precision, device, bf16, fp16, use_cpu):
    """DPO and GRPO hand precision to TRL's TrainingArguments: fp16 must reach it (once only bf16 was passed
    and an fp16 recipe trained in fp32 while its manifest said fp16)."""
    from ftl.config.schema import Recipe
    from ftl.stages.trl_common import trainer_arguments

    recipe = Recipe.model_validate({**tiny_recipe_dict(tmp_path), "train": {"precision": precision},
                                    "launch": {"device": device}})
    args = trainer_arguments(recipe, tmp_path, main=True)
    assert (args["bf16"], args["fp16"], args["use_cpu"]) == (bf16, fp16, use_cpu)
