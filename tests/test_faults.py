"""Faults: SIGKILL mid-run or inside a checkpoint write then --resume, and SIGTERM/SIGUSR1
checkpoint-and-exit, reproduce the curve, and each resume says (and records) the checkpoint it took."""

import os
import re
import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import (assert_resumed_from, complete_checkpoint_steps, ftl_command, read_jsonl, run_ftl,
                      subprocess_env, tiny_recipe_dict, train_losses, write_recipe)

STEPS = 150
# Adapter methods: checkpoints hold the adapter alone, the frozen base is rebuilt on resume (dropout on, so
# the RNG states must come back too). QLoRA's 4-bit CPU path needs hidden size 64.
METHODS = {"full": {"method": {"kind": "full"}},
           "lora": {"method": {"kind": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}}},
           "qlora": {"method": {"kind": "qlora", "lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
                     "model": {"tiny": {"hidden_size": 64, "intermediate_size": 128}}}}


def long_recipe(tmp_path, name, method="full"):
    # Many short steps, so a signal reliably lands mid-run; checkpoints every 10 steps.
    sections = METHODS[method]
    model = tiny_recipe_dict(tmp_path)["model"]
    model["tiny"] = {**model["tiny"], **sections.get("model", {}).get("tiny", {})}
    recipe = tiny_recipe_dict(tmp_path / name, train={"max_steps": STEPS, "save_every": 10, "batch_size": 2,
                                                      "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 5},
                              eval={"max_examples": 4, "generate": {"from_validation": 0}},
                              method=sections["method"], model=model)
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """method → its uninterrupted run, made on first use."""
    runs = {}

    def run(method: str):
        if method not in runs:
            tmp = tmp_path_factory.mktemp(f"faults-{method}")
            proc = run_ftl("run", str(long_recipe(tmp, "straight", method)), cwd=tmp)
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[method] = tmp / "straight"
        return runs[method]
    return run


@pytest.fixture(scope="module")
def uninterrupted(straight_runs):
    return straight_runs("full")


def start_and_interrupt(tmp_path, name, sig, at_step=45, method="full") -> subprocess.Popen:
    recipe = long_recipe(tmp_path, name, method)
    proc = subprocess.Popen(ftl_command("run", str(recipe)), cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / name / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    proc.wait(timeout=120)
    return proc


def assert_same_run(resumed, straight):
    assert train_losses(resumed) == train_losses(straight)
    assert [r["lr"] for r in read_jsonl(resumed / "metrics.jsonl")] == \
        [r["lr"] for r in read_jsonl(straight / "metrics.jsonl")]
    files = sorted(p.name for p in (straight / "final").glob("*.safetensors"))  # the adapter alone for adapters
    assert files and files == sorted(p.name for p in (resumed / "final").glob("*.safetensors"))
    for name in files:
        a, b = load_file(resumed / "final" / name), load_file(straight / "final" / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.parametrize("method", list(METHODS))
def test_sigkill_then_resume_reproduces_the_uninterrupted_run(straight_runs, tmp_path, method):
    proc = start_and_interrupt(tmp_path, "killed", signal.SIGKILL, method=method)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "killed"
    assert not (run / "final").exists()
    steps = complete_checkpoint_steps(run)
    assert steps and steps[-1] < STEPS
    if method != "full":  # the checkpoint resumed from holds the adapter, not the base
        saved = load_file(run / "checkpoints" / f"step-{steps[-1]:07d}" / "model.safetensors")
        assert saved and all(".lora_" in name for name in saved), sorted(saved)[:5]
    resumed = run_ftl("run", str(tmp_path / "killed.yaml"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_from(resumed.stdout + resumed.stderr, run, steps[-1], STEPS)
    assert_same_run(run, straight_runs(method))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_exits_cleanly_and_resumes_exactly(uninterrupted, tmp_path, sig):
    proc = start_and_interrupt(tmp_path, "signalled", sig)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    assert f"{sig.name} received: checkpoint saved at step" in output
    run = tmp_path / "signalled"
    stopped_at = len(read_jsonl(run / "metrics.jsonl"))
    assert stopped_at < STEPS
    assert complete_checkpoint_steps(run)[-1] == stopped_at  # saved exactly where it stopped
    resumed = run_ftl("run", str(tmp_path / "signalled.yaml"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_from(resumed.stdout + resumed.stderr, run, stopped_at, STEPS)
    assert_same_run(run, uninterrupted)


def test_a_finished_run_leaves_only_complete_checkpoints(uninterrupted):
    names = [p.name for p in (uninterrupted / "checkpoints").iterdir()]
    assert names and all(re.fullmatch(r"step-\d+", n) for n in names), names  # no temporary folder left behind
    for ckpt in (uninterrupted / "checkpoints").iterdir():
        assert (ckpt / "trainer_state.json").exists() and (ckpt / "model.safetensors").exists()


def in_progress(names) -> list[str]:
    """Entries of checkpoints/ that are not finished `step-N` folders: a checkpoint being written."""
    return [n for n in names if not re.fullmatch(r"step-\d+", n)]


def kill_inside_a_write(proc: subprocess.Popen, checkpoints, deadline: float) -> str | None:
    """Poll checkpoints/ and SIGKILL the run the moment a checkpoint is being written (after at least one
    complete checkpoint exists). The folder being written, if it was still unfinished after the kill."""
    while time.time() < deadline and proc.poll() is None:
        try:
            names = os.listdir(checkpoints)
        except FileNotFoundError:
            names = []
        writing = in_progress(names)
        if writing and any(re.fullmatch(r"step-\d+", n) for n in names):
            proc.kill()
            proc.wait(timeout=60)
            torn = [n for n in writing if (checkpoints / n).exists()]
            return torn[0] if torn else None  # else the write finished between the look and the kill
        time.sleep(0.0005)
    proc.kill()
    proc.wait(timeout=60)
    return None


def test_a_kill_inside_a_checkpoint_write_resumes_from_the_previous_complete_one(uninterrupted, tmp_path):
    recipe, run = long_recipe(tmp_path, "torn"), tmp_path / "torn"
    checkpoints = run / "checkpoints"
    torn, deadline = None, time.time() + 300
    for attempt in range(8):  # a missed window leaves a killed run: the next attempt resumes it and tries again
        args = ["run", str(recipe)] + (["--resume"] if attempt else [])
        proc = subprocess.Popen(ftl_command(*args), cwd=tmp_path, env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        torn = kill_inside_a_write(proc, checkpoints, deadline)
        assert proc.returncode == -signal.SIGKILL, "the run ended before a checkpoint write could be interrupted"
        if torn or time.time() > deadline:
            break
    assert torn, f"no kill landed inside a checkpoint write in {attempt + 1} attempts"
    print(f"killed inside the write of {torn} on attempt {attempt + 1}")
    assert (checkpoints / torn).exists()  # the unfinished write was there when the run died
    assert not (run / "final").exists()
    complete = complete_checkpoint_steps(run)
    torn_step = int(re.search(r"\d+", torn).group())
    assert complete and complete[-1] < torn_step, (complete, torn)
    resumed = run_ftl("run", str(recipe), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_resumed_from(resumed.stdout + resumed.stderr, run, complete[-1], STEPS)  # the previous complete one
    assert_same_run(run, uninterrupted)
    assert not in_progress(os.listdir(checkpoints))  # the torn write was replaced, not left behind
