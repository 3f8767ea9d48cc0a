"""Faults: SIGKILL mid-run then --resume, and SIGTERM/SIGUSR1 checkpoint-and-exit, reproduce the curve."""

import signal
import subprocess
import time

import pytest
from safetensors.torch import load_file

from conftest import ftl_command, read_jsonl, run_ftl, subprocess_env, tiny_recipe_dict, train_losses, write_recipe

STEPS = 150


def long_recipe(tmp_path, name):
    # Many short steps, so a signal reliably lands mid-run; checkpoints every 10 steps.
    recipe = tiny_recipe_dict(tmp_path / name, train={"max_steps": STEPS, "save_every": 10, "batch_size": 2,
                                                      "lr": 3e-3, "scheduler": "cosine", "warmup_steps": 5},
                              eval={"max_examples": 4, "generate": {"from_validation": 0}})
    return write_recipe(tmp_path / f"{name}.yaml", recipe)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    proc = run_ftl("run", str(long_recipe(tmp, "straight")), cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "straight"


def start_and_interrupt(tmp_path, name, sig, at_step=45) -> subprocess.Popen:
    recipe = long_recipe(tmp_path, name)
    proc = subprocess.Popen(ftl_command("run", str(recipe)), cwd=tmp_path, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / name / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= at_step:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    proc.wait(timeout=300)
    return proc


def assert_same_run(resumed, straight):
    assert train_losses(resumed) == train_losses(straight)
    assert [r["lr"] for r in read_jsonl(resumed / "metrics.jsonl")] == \
        [r["lr"] for r in read_jsonl(straight / "metrics.jsonl")]
    a, b = load_file(resumed / "final" / "model.safetensors"), load_file(straight / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    proc = start_and_interrupt(tmp_path, "killed", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    run = tmp_path / "killed"
    assert not (run / "final").exists()
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert steps and steps[-1] < STEPS
    resumed = run_ftl("run", str(tmp_path / "killed.yaml"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from" in resumed.stdout + resumed.stderr
    assert_same_run(run, uninterrupted)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoints_exits_cleanly_and_resumes_exactly(uninterrupted, tmp_path, sig):
    proc = start_and_interrupt(tmp_path, "signalled", sig)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    assert f"{sig.name} received: checkpoint saved at step" in output
    run = tmp_path / "signalled"
    stopped_at = len(read_jsonl(run / "metrics.jsonl"))
    assert stopped_at < STEPS
    assert (run / "checkpoints" / f"step-{stopped_at:07d}").is_dir()  # saved exactly where it stopped
    resumed = run_ftl("run", str(tmp_path / "signalled.yaml"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_run(run, uninterrupted)


def test_checkpoints_are_written_atomically(uninterrupted):
    names = [p.name for p in (uninterrupted / "checkpoints").iterdir()]
    assert names == sorted(names) and all(n.startswith("step-") for n in names)  # no .tmp left behind
    for ckpt in (uninterrupted / "checkpoints").iterdir():
        assert (ckpt / "trainer_state.json").exists() and (ckpt / "model.safetensors").exists()
