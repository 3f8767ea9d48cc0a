"""The run folder is never lost: a finished run is not replaced without --overwrite (and not before the new
run validates), one run per folder (the lock), --resume continues only the same training from a complete
checkpoint, and the manifest keeps every attempt. Runs are in-process (`ftl.cli.main`): no interpreter
start per case."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import ftl_command, subprocess_env, tiny_recipe_dict, write_recipe
from ftl.cli import main
from ftl.run_dir import LOCK_FILE

KEPT = ("final", "checkpoints", "tokenizer", "base", "manifest.json", "metrics.jsonl", "recipe.yaml")


def ftl(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def snapshot(run_dir) -> dict:
    """Every file under the run folder with its size and modification time."""
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run: 16 steps, checkpoints every 4 (steps 12 and 16 kept)."""
    tmp = tmp_path_factory.mktemp("run_folder")
    recipe = write_recipe(tmp / "r.yaml", tiny_recipe_dict(tmp / "run", train={"max_steps": 16, "save_every": 4}))
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(recipe)])
    assert exit_info.value.code == 0
    return recipe, tmp / "run"


def copy_of(finished, tmp_path):
    recipe, run = finished
    target = tmp_path / "run"
    shutil.copytree(run, target)
    text = recipe.read_text().replace(str(run), str(target))
    copied = tmp_path / "r.yaml"
    copied.write_text(text)
    return copied, target


def test_a_finished_run_is_not_replaced_without_overwrite(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    before = snapshot(run)
    code, _, err = ftl(capsys, "run", str(recipe))
    assert code == 2 and err.startswith("ftl: error: ") and "Traceback" not in err
    assert str(run) in err and "a finished run" in err and "--overwrite" in err and "--resume" in err
    assert snapshot(run) == before


def test_a_failing_overwrite_removes_nothing(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    before = snapshot(run)
    code, _, err = ftl(capsys, "run", str(recipe), "--overwrite", f"data.source={{kind: jsonl, path: {tmp_path}/none.jsonl}}")
    assert code == 2 and "none.jsonl does not exist" in err and "Traceback" not in err
    assert snapshot(run) == before  # final/, checkpoints/, tokenizer/, base/ and the manifest all intact
    assert json.loads((run / "manifest.json").read_text())["finished"] is True


def test_overwrite_replaces_the_run_once_it_validates(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    code, _, err = ftl(capsys, "run", str(recipe), "--overwrite", "train.max_steps=4", "train.save_every=2")
    assert code == 0, err
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["step-0000002", "step-0000004"]  # the old run's step-12/16 are gone
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["finished"] is True and manifest["steps"] == 4 and len(manifest["attempts"]) == 1


def test_resume_with_a_changed_recipe_lists_the_changed_keys(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    before = snapshot(run)
    code, _, err = ftl(capsys, "run", str(recipe), "--resume", "train.lr=0.001", "data.split.seed=3",
                       "train.max_steps=20")
    assert code == 2 and "Traceback" not in err
    assert "train.lr: 0.01 → 0.001" in err
    assert "data.split.seed: 0 → 3" in err and "data split 'train': fingerprint" in err
    assert "train.max_steps" not in err.split("safe to change")[0]  # a longer run is allowed
    assert snapshot(run) == before


def test_resume_with_allowed_changes_continues_and_keeps_every_attempt(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    code, out, err = ftl(capsys, "run", str(recipe), "--resume", "train.max_steps=20", "eval.every=2",
                         "train.log_every=2")
    assert code == 0, err
    assert "resumed from" in out + err and "step-0000016" in out + err
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == 16 and manifest["steps"] == 20
    assert [a["resumed_from_step"] for a in manifest["attempts"]] == [None, 16]


def test_a_resumed_run_makes_the_gradient_checkpointing_choice_of_the_run_it_continues(finished, tmp_path, capsys):
    """auto is resolved once, by the fresh run, and kept in its contract: a resume takes that choice (even if
    the plan would now decide otherwise); an explicit setting that differs is a change the contract refuses."""
    recipe, run = copy_of(finished, tmp_path)
    contract_file = run / "resume_contract.json"
    contract = json.loads(contract_file.read_text())
    assert contract["recipe"]["model.gradient_checkpointing"] is False  # auto, off for the tiny model
    contract["recipe"]["model.gradient_checkpointing"] = True  # as if the plan had said on when it started
    contract_file.write_text(json.dumps(contract))
    code, out, err = ftl(capsys, "run", str(recipe), "--resume", "train.max_steps=18")
    assert code == 0, err
    assert "ftl: gradient checkpointing on: auto: as the run being resumed chose" in out
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["gradient_checkpointing"]["on"] is True and manifest["steps"] == 18
    code, _, err = ftl(capsys, "run", str(recipe), "--resume", "train.max_steps=20",
                       "model.gradient_checkpointing=false")
    assert code == 2 and "model.gradient_checkpointing: True → False" in err


def test_resume_past_the_recipes_end_is_refused(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    code, _, err = ftl(capsys, "run", str(recipe), "--resume", "train.max_steps=10")
    assert code == 2 and "step 16, past the end of this recipe (step 10" in err and "Traceback" not in err


def test_resume_with_nothing_to_resume_says_so(tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "empty"))
    code, _, err = ftl(capsys, "run", str(recipe), "--resume")
    assert code == 2 and "has no complete checkpoint, so there is nothing to resume" in err


@pytest.mark.parametrize("damage, why", [
    ("truncate", "model.safetensors has"),
    ("optimizer", "optimizer.bin is missing"),
    ("state", "trainer_state.json is unreadable"),
    ("marker", "no COMPLETE marker"),
])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_complete_one(finished, tmp_path, capsys, damage, why):
    recipe, run = copy_of(finished, tmp_path)
    latest = run / "checkpoints" / "step-0000016"
    if damage == "truncate":
        weights = latest / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "optimizer":
        (latest / "optimizer.bin").unlink()
    elif damage == "state":
        (latest / "trainer_state.json").write_text("{not json")
    else:
        (latest / "COMPLETE").unlink()
    (run / "checkpoints" / "step-junk").mkdir()  # stray folders are not checkpoints
    (run / "checkpoints" / "notes").mkdir()
    code, out, err = ftl(capsys, "run", str(recipe), "--resume")
    assert code == 0, err
    assert f"checkpoint {latest} is incomplete or damaged ({why}" in out + err
    assert "step-0000012" in out + err
    assert json.loads((run / "manifest.json").read_text())["resumed_from_step"] == 12
    assert (run / "checkpoints" / "step-junk").is_dir() and (run / "checkpoints" / "notes").is_dir()


def test_a_second_run_into_a_used_folder_is_refused_by_the_lock(tmp_path):
    """A real run holds the lock; a second one (also real) is refused naming the holder, then the first
    finishes normally and releases it."""
    recipe = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", train={"max_steps": 3000,
                                                                                        "save_every": 100}))
    first = subprocess.Popen(ftl_command("run", str(recipe)), cwd=tmp_path, env=subprocess_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lock = tmp_path / "run" / LOCK_FILE
        deadline = time.time() + 120
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.exists(), "the first run never took the lock"
        holder = json.loads(lock.read_text())
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        second = subprocess.run(ftl_command("run", str(recipe), "--overwrite"), cwd=tmp_path, env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"another run is using this folder (pid {first.pid} on {socket.gethostname()}, started " \
               f"{holder['started']}" in second.stderr
        assert first.poll() is None  # the first run was left alone
        metrics = tmp_path / "run" / "metrics.jsonl"
        while time.time() < deadline + 120 and not (metrics.exists() and metrics.read_text().strip()):
            time.sleep(0.2)  # training (its SIGTERM handler installed) before it is stopped
    finally:
        first.terminate()  # SIGTERM: checkpoint and exit
        output = first.communicate(timeout=120)[0]
    assert first.returncode == 0 and "SIGTERM received: checkpoint saved" in output, output[-2000:]
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released on exit


def test_a_stale_lock_from_a_dead_process_is_taken_over(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                             "started": "2026-12-01T00:00:00"}))
    code, out, err = ftl(capsys, "run", str(recipe), "--resume", "train.max_steps=18")
    assert code == 0, err
    assert f"took over a stale lock on {run}: its holder is gone (pid {int(dead.stdout)}" in out + err
    assert not (run / LOCK_FILE).exists()


def test_a_live_lock_holder_on_this_host_blocks(finished, tmp_path, capsys):
    recipe, run = copy_of(finished, tmp_path)
    (run / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                             "started": "2026-12-01T00:00:00"}))
    before = snapshot(run)
    code, _, err = ftl(capsys, "run", str(recipe), "--resume", "train.max_steps=18")
    assert code == 2 and f"pid {os.getppid()}" in err and "delete" in err
    assert snapshot(run) == before
