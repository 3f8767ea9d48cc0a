"""Full fine-tune under real DeepSpeed ZeRO-3 on 2 CPU ranks: partitioning, DDP parity, save, resume."""

import json
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import (ROOT, assert_resumed_from, complete_checkpoint_steps, ftl_command, kill_process_tree,
                      read_jsonl, run_ftl, subprocess_env, tiny_recipe_dict, train_losses, write_recipe)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model every run starts from (same initial weights for DDP and ZeRO-3)."""
    from ftl.config.schema import DataConfig, TinyModelConfig
    from ftl.data import load_splits
    from ftl.models.load import record_texts
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("zero3")
    base = tiny_recipe_dict(tmp / "unused")
    tokenizer = train_tiny_tokenizer(record_texts(load_splits(DataConfig.model_validate(base["data"]))[0].train), 400)
    model = build_tiny_model(TinyModelConfig(**base["model"]["tiny"]), tokenizer, seed=0)
    model.save_pretrained(tmp / "init")
    tokenizer.save_pretrained(tmp / "init")
    return tmp


def zero3_recipe(workdir, name, deepspeed="launch/ds_zero3.json", config="launch/zero3.yaml", **train):
    recipe = tiny_recipe_dict(
        workdir / name, model={"source": "path", "path": str(workdir / "init")},
        train={"max_steps": 12, "save_every": 3, "batch_size": 2, "scheduler": "cosine", "warmup_steps": 2, **train},
        eval={"max_examples": 8, "generate": {"from_validation": 0}},
        launch={"num_processes": 2, "deepspeed": str(ROOT / deepspeed) if deepspeed else None,
                "config_file": str(ROOT / config) if config else None})
    return write_recipe(workdir / f"{name}.yaml", recipe)


def launch(workdir, recipe, *extra, timeout=600):
    proc = run_ftl("launch", str(recipe), *extra, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def adam_run(workdir):
    launch(workdir, zero3_recipe(workdir, "adam"))
    return workdir / "adam"


def test_world_size_two_and_each_rank_holds_half(adam_run):
    manifest = json.loads((adam_run / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    checks = sorted(manifest["rank_checks"], key=lambda c: c["rank"])
    assert [c["world_size"] for c in checks] == [2, 2]
    full = checks[0]["zero"]["param_numel_full"]
    assert full == manifest["trainable"]["total_params"]
    for c in checks:
        z = c["zero"]
        assert z["param_numel_local"] * 2 == full                 # half of every parameter
        assert z["optimizer_state_numel"] == 2 * z["param_numel_local"]  # Adam m and v for its half only
        assert z["master_numel"] * 2 == full
    assert checks[0]["param_digest"] != checks[1]["param_digest"]  # different halves, not replicas


def test_loss_falls_and_the_consolidated_model_reloads_with_identical_logits(adam_run):
    losses = train_losses(adam_run)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.4, losses
    from ftl.data import load_splits
    from ftl.evaluate.lm import lm_loss
    from ftl.models.trained import load_trained_causal_lm
    from ftl.data.tokenize import encode_records

    model, tokenizer, recipe = load_trained_causal_lm(adam_run)  # one process, no DeepSpeed
    validation = load_splits(recipe.data)[0].validation[: recipe.eval.max_examples]
    reloaded = lm_loss(model, encode_records(tokenizer, validation, recipe.data), tokenizer.pad_token_id)
    trained = json.loads((adam_run / "eval.json").read_text())["after"]  # computed by the 2 ZeRO-3 ranks
    assert reloaded["tokens"] == trained["tokens"]
    assert reloaded["loss"] == pytest.approx(trained["loss"], abs=1e-5)


def test_zero_checkpoint_converts_with_zero_to_fp32(adam_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    last = sorted((adam_run / "checkpoints").glob("step-*"))[-1]
    state = get_fp32_state_dict_from_zero_checkpoint(str(last / "pytorch_model"), tag=None) \
        if (last / "pytorch_model" / "latest").exists() else get_fp32_state_dict_from_zero_checkpoint(str(last))
    final = load_file(adam_run / "final" / "model.safetensors")
    assert set(final) <= set(state)
    for name, tensor in final.items():
        torch.testing.assert_close(state[name].float(), tensor.float(), atol=0, rtol=0)


def test_zero3_loss_equals_ddp_step_by_step_with_sgd(workdir):
    launch(workdir, zero3_recipe(workdir, "sgd_zero3", optimizer="sgd", lr=0.05, max_steps=8))
    launch(workdir, zero3_recipe(workdir, "sgd_ddp", deepspeed=None, config=None, optimizer="sgd", lr=0.05,
                                 max_steps=8))
    zero3, ddp = train_losses(workdir / "sgd_zero3"), train_losses(workdir / "sgd_ddp")
    assert len(zero3) == len(ddp) == 8
    assert max(abs(a - b) for a, b in zip(zero3, ddp)) < 1e-5, (zero3, ddp)
    assert json.loads((workdir / "sgd_ddp" / "manifest.json").read_text())["world_size"] == 2


def test_killed_zero3_run_resumes_to_the_same_curve_and_schedule(workdir, adam_run):
    recipe = zero3_recipe(workdir, "killed")
    proc = subprocess.Popen(ftl_command("launch", str(recipe)), cwd=ROOT, env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = workdir / "killed" / "metrics.jsonl"
    deadline, killed_at = time.time() + 300, None
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(lines := metrics.read_text().splitlines()) >= 7:
            kill_process_tree(proc.pid)  # the launchers and both ranks (which run in sessions of their own)
            killed_at = len(lines)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert killed_at is not None and killed_at < 12, f"not killed mid-run (rc {proc.returncode}, {killed_at} steps)"
    assert len(metrics.read_text().splitlines()) < 12 and not (workdir / "killed" / "final").exists()  # none trained on
    before = complete_checkpoint_steps(workdir / "killed")  # what resume must take: the newest complete one
    assert before and before[-1] < 12, before
    proc = launch(workdir, recipe, "--resume")
    assert_resumed_from(proc.stdout + proc.stderr, workdir / "killed", before[-1], 12)
    resumed, straight = read_jsonl(metrics), read_jsonl(adam_run / "metrics.jsonl")
    assert [r["loss"] for r in resumed if "loss" in r] == [r["loss"] for r in straight if "loss" in r]
    assert [r["lr"] for r in resumed if "lr" in r] == [r["lr"] for r in straight if "lr" in r]


def test_optimizer_offload_trains_like_the_same_run_without_offload(workdir, adam_run):
    # DeepSpeedCPUAdam compiles once (~2 min cold) and is cached in ~/.cache/torch_extensions
    launch(workdir, zero3_recipe(workdir, "offload", deepspeed="launch/ds_zero3_offload_optimizer.json",
                                 config="launch/zero3_offload.yaml", save_every=12), timeout=900)
    # adam_run is this recipe without offload (same initial weights, batches and schedule; torch AdamW on
    # the ranks): an offloaded optimizer that does not step, or steps differently, leaves this curve
    losses, straight = train_losses(workdir / "offload"), train_losses(adam_run)
    assert len(losses) == len(straight) == 12
    assert losses[0] == pytest.approx(straight[0], abs=1e-5)  # before any update: the same model and batch
    assert max(abs(a - b) for a, b in zip(losses, straight)) < 1e-3, (losses, straight)  # measured 1.4e-6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.4, losses
    assert (workdir / "offload" / "final" / "model.safetensors").exists()
    manifest = json.loads((workdir / "offload" / "manifest.json").read_text())
    assert all(c["zero"]["param_numel_local"] * 2 == c["zero"]["param_numel_full"] for c in manifest["rank_checks"])


@pytest.mark.parametrize("launcher", ["accelerate_by_hand", "deepspeed", "torchrun"])
def test_the_same_recipe_runs_under_every_launcher(workdir, launcher):
    recipe = zero3_recipe(workdir, f"via_{launcher}", max_steps=3, save_every=3)
    run_args = ["-m", "ftl", "run", str(recipe)]
    port = str(json.loads(json.dumps(__import__("yaml").safe_load(recipe.read_text())["launch"]))["main_process_port"])
    commands = {
        "accelerate_by_hand": ["-m", "accelerate.commands.launch", "--config_file", "launch/zero3.yaml",
                               "--num_processes", "2", "--main_process_port", port] + run_args,
        "deepspeed": ["-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port,
                      "--no_local_rank", "--module", "ftl", "run", str(recipe)],
        "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port] + run_args,
    }
    import sys

    proc = subprocess.run([sys.executable] + commands[launcher], cwd=ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    manifest = json.loads((workdir / f"via_{launcher}" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "zero" in manifest["rank_checks"][0]


def test_a_launch_that_would_drop_deepspeed_or_ranks_fails_loudly(workdir):
    recipe = zero3_recipe(workdir, "refused", max_steps=2)
    single = run_ftl("run", str(recipe), cwd=ROOT)  # one process for a 2-rank recipe
    assert single.returncode != 0
    assert "ask for 2 processes" in single.stderr and "this run has 1" in single.stderr
    import sys

    cpu_flag = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                               "--config_file", "launch/zero3.yaml", "-m", "ftl", "run", str(recipe)],
                              cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert cpu_flag.returncode != 0
    assert "LaunchError" in cpu_flag.stderr or "ftl: error" in cpu_flag.stderr
    assert not (workdir / "refused" / "final").exists()


def test_plan_matches_the_memory_measured_on_each_rank(adam_run):
    from ftl.config import load_recipe
    from ftl.plan import make_plan

    recipe = load_recipe(adam_run / "recipe.yaml")
    planned = make_plan(recipe).chosen
    assert planned.gather_buffer > 0  # ZeRO-3 working buffer counted separately
    for check in json.loads((adam_run / "manifest.json").read_text())["rank_checks"]:
        measured = check["zero"]
        assert measured["model_state_bytes"] == pytest.approx(planned.model_states, rel=0.10)
        assert measured["param_bytes"] == pytest.approx(planned.params, rel=0.10)
        assert measured["optimizer_state_bytes"] == pytest.approx(planned.optimizer, rel=0.10)


def test_bf16_gradients_accumulate_in_the_fp32_partition_the_plan_counts(workdir):
    """The shipped JSON's data_types.grad_accum_dtype fp32 reaches DeepSpeed: a bf16 run with 2 micro-batches
    per step keeps its gradient partition in fp32 (2x the bytes of its bf16 parameter shard), as planned."""
    from ftl.config import load_recipe
    from ftl.plan import make_plan

    launch(workdir, zero3_recipe(workdir, "bf16", precision="bf16", grad_accum=2, max_steps=3, save_every=3))
    planned = make_plan(load_recipe(workdir / "bf16" / "recipe.yaml")).chosen
    assert planned.grads == 0 and planned.grad_accum > 0
    for check in json.loads((workdir / "bf16" / "manifest.json").read_text())["rank_checks"]:
        measured = check["zero"]
        assert measured["param_bytes"] == 2 * measured["param_numel_local"]  # bf16 shards
        assert measured["grad_bytes"] == 4 * measured["param_numel_local"]   # fp32 accumulation
        assert measured["grad_bytes"] == pytest.approx(planned.grad_accum, rel=0.10)
        assert measured["model_state_bytes"] == pytest.approx(planned.model_states, rel=0.10)
