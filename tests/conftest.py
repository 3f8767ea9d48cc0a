"""Shared test helpers: tiny recipes written into a temp folder, subprocess runs, free ports."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"

# pytest-timeout's per-test limit (pyproject), which counts fixture setup too. One subprocess may take at
# most half of it, so a fixture's run plus the test's own run ends (with its own output) before pytest
# kills the test; tests that run several in a row keep their sum below PYTEST_TIMEOUT.
PYTEST_TIMEOUT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["timeout"]
MAX_SUBPROCESS_TIMEOUT = PYTEST_TIMEOUT // 2

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def tiny_recipe_dict(run_dir: Path, **sections) -> dict:
    """A small, fast SFT recipe on real chatterbot conversations with the tiny model."""
    recipe = {
        "name": "t",
        "stage": "sft",
        "model": {"source": "tiny", "tiny": {"hidden_size": 32, "intermediate_size": 64,
                                             "num_attention_heads": 4, "num_key_value_heads": 2,
                                             "vocab_size": 400}},
        "method": {"kind": "full"},
        "data": {"source": {"kind": "chatterbot", "languages": ["english"]}, "format": "chat",
                 "max_length": 96, "packing": True, "limit": 600, "split": {"validation": 0.1}},
        "train": {"lr": 1e-2, "max_steps": 16, "batch_size": 4, "warmup_steps": 2, "save_every": 4,
                  "scheduler": "linear"},
        "eval": {"max_examples": 16, "generate": {"from_validation": 1, "max_new_tokens": 4}},
        "track": {"output_dir": str(run_dir), "plot": True},
        "launch": {"main_process_port": free_port()},
    }
    for key, value in sections.items():
        recipe[key] = {**recipe.get(key, {}), **value} if isinstance(value, dict) else value
    return recipe


def tiny_ppo_recipe(tiny_recipe, name: str, advantage: str, samples_per_prompt: int):
    """PPO's tiny run on the letter-count reward, from a fresh tiny model, with `advantage`: 16 responses per step."""
    return tiny_recipe(f"{name}.yaml", stage="ppo",
                       data={"format": "prompts", "packing": False},
                       reward={"kind": "function", "function": "ftl.rl.reward_functions:count_substring",
                               "kwargs": {"target": "e"}, "missing_eos_penalty": None},
                       sampling={"max_new_tokens": 12},
                       ppo={"advantage": advantage, "samples_per_prompt": samples_per_prompt,
                            "rollout_batch": 16 // samples_per_prompt, "mini_batch": 8, "kl_coef": 0.05},
                       train={"lr": 1e-2, "max_steps": 20, "save_every": 20, "warmup_steps": 0},
                       eval={"max_examples": 8})


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def copy_rlhf_pipeline(tmp_path: Path, stages=None, **stage_overrides) -> Path:
    """recipes/rlhf/pipeline.yaml writing into tmp_path/out, optionally only some stages, with overrides."""
    source = RECIPES / "rlhf" / "pipeline.yaml"
    spec = yaml.safe_load(source.read_text())
    spec["output_dir"] = str(tmp_path / "out")
    spec["stages"] = [s for s in spec["stages"] if stages is None or s["name"] in stages]
    if spec.get("judge") not in {s["name"] for s in spec["stages"]}:
        spec.pop("judge", None)
    for stage in spec["stages"]:
        stage["recipe"] = str(source.parent / stage["recipe"])
        stage["overrides"] = stage.get("overrides", []) + stage_overrides.get(stage["name"], [])
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **extra}
    return env


def ftl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "ftl", *args]


def torchrun_two_ranks(script: str, out: Path, timeout: int) -> dict:
    """Run tests/`script` on 2 gloo ranks under torchrun; the JSON report it wrote to `out`."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "tests" / script), str(out)],
                          cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def run_ftl(*args: str, cwd: Path, timeout: int = 600, **env) -> subprocess.CompletedProcess:
    assert timeout <= MAX_SUBPROCESS_TIMEOUT, f"timeout {timeout} s: at most half of pytest's {PYTEST_TIMEOUT} s"
    return subprocess.run(ftl_command(*args), cwd=cwd, env=subprocess_env(**env), capture_output=True,
                          text=True, timeout=timeout)


def kill_process_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it, as a machine failure would, and wait until all are gone.
    Killing the launcher's process group is not enough: torch's elastic agent (accelerate launch, torchrun)
    starts each rank in a session of its own, and orphaned ranks go on training."""
    import psutil

    root = psutil.Process(pid)
    procs = [root] + root.children(recursive=True)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=60)
    assert not alive, f"still running after SIGKILL: {alive}"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]


def complete_checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in run_dir/checkpoints (step-N folders whose COMPLETE marker matches)."""
    from ftl.train.checkpoint import problem, step_folders

    return [int(p.name.split("-")[1]) for p in step_folders(run_dir) if problem(p) is None]


RESUMED = re.compile(r"ftl: resumed from (\S+) \(step (\d+) of (\d+)\)")


def assert_resumed_from(output: str, run_dir: Path, step: int, total: int) -> None:
    """The run really resumed, from checkpoint `step`: it says so, naming that checkpoint, and its manifest
    records the step. (A fresh run that ignored the checkpoints reproduces an uninterrupted run exactly,
    so an identical loss curve alone does not prove a resume happened.)"""
    said = RESUMED.findall(output)
    ftl_lines = "\n".join(line for line in output.splitlines() if line.startswith("ftl:"))
    assert said, f"no 'ftl: resumed from' line; the run's ftl: lines:\n{ftl_lines}"
    path, said_step, said_total = said[-1]
    assert Path(path).name == f"step-{step:07d}", said[-1]
    assert Path(path).parent.resolve() == (run_dir / "checkpoints").resolve(), said[-1]
    assert (int(said_step), int(said_total)) == (step, total), said[-1]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    recorded = manifest.get("resumed_from_step")
    if recorded is None and manifest.get("attempts"):  # a manifest keeping every attempt: the latest one
        recorded = manifest["attempts"][-1].get("resumed_from_step")
    assert recorded == step, f"manifest resumed_from_step {recorded!r}, expected {step}"


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state; each Accelerator built here starts from none and leaves none
    (an in-process run at another precision than an earlier one would be refused by accelerate)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def tiny_recipe(tmp_path):
    def make(name="recipe.yaml", run_dir=None, **sections) -> Path:
        return write_recipe(tmp_path / name, tiny_recipe_dict(run_dir or tmp_path / "run", **sections))
    return make
