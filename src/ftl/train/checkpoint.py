"""Atomic, verifiable checkpoints.

A checkpoint is written into `.tmp-step-N`, then a marker (`COMPLETE`: every file's size) is written
last and the folder renamed to `step-N`. Only a `step-N` folder whose marker lists files that are all
there, at their sizes, with a readable state file, is complete. Resume takes the newest complete one
and names each newer one it skips (a kill mid-write, a truncated or missing file, a stray folder);
pruning counts and removes complete checkpoints only and leaves anything else alone.

Inside is accelerate's state (model, optimizer, scheduler, RNG states); a run whose method or train.freeze
keeps a base frozen leaves that base out and records its digests (ftl.train.frozen_base).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional

from ftl.errors import RecipeError
from ftl.run_dir import CHECKPOINTS_DIR, TRL_DIR

STATE_FILE = "trainer_state.json"
MARKER_FILE = "COMPLETE"
PREFIX = "step-"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def step_of(path: Path) -> Optional[int]:
    number = path.name[len(PREFIX):] if path.name.startswith(PREFIX) else ""
    return int(number) if number.isdigit() else None


def problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None when it is."""
    marker = path / MARKER_FILE
    if not marker.is_file():
        return f"no {MARKER_FILE} marker (the write did not finish)"
    try:
        sizes = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {MARKER_FILE} marker"
    try:
        json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"{STATE_FILE} is unreadable"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
    return None


def step_folders(run_dir: Path) -> list[Path]:
    """`step-N` folders, oldest first (anything else in checkpoints/ is not a checkpoint)."""
    root = checkpoint_dir(run_dir)
    found = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: Path, report: Optional[Callable[[str], None]] = None) -> Optional[Path]:
    """The newest complete checkpoint; `report` hears about each newer one that is skipped, and why."""
    for path in reversed(step_folders(run_dir)):
        why = problem(path)
        if why is None:
            return path
        if report is not None:
            report(f"ftl: checkpoint {path} is incomplete or damaged ({why}): skipped")
    return None


def resume_point(run_dir: Path, report: Optional[Callable[[str], None]] = None) -> int:
    """The step --resume continues from: the newest complete checkpoint of ftl's loop, or of a TRL-backed
    stage (`trl/checkpoint-N`). Nothing to resume is an error, not a silent fresh start."""
    checkpoint = latest_checkpoint(run_dir, report)
    if checkpoint is not None:
        return step_of(checkpoint)
    trl = sorted(int(p.name.split("-")[1]) for p in (run_dir / TRL_DIR).glob("checkpoint-*")
                 if p.name.split("-")[1].isdigit())
    if trl:
        return trl[-1]
    raise RecipeError(f"--resume: {run_dir} has no complete checkpoint, so there is nothing to resume; run "
                      "without --resume to start (checkpoints are written every train.save_every steps and when "
                      "a run is stopped by SIGTERM/SIGUSR1)")


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: DeepSpeed writes its own shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MARKER_FILE).write_text(json.dumps({"step": step, "files": sizes}, indent=1))  # last: complete
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        complete = [p for p in step_folders(run_dir) if problem(p) is None]
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_state(path: Path) -> dict:
    """The loop's own state saved with a checkpoint (step, unfreeze phase, early-stopping record)."""
    state = json.loads((path / STATE_FILE).read_text())
    if "unfreeze_stage" in state:  # written before unfreeze stages were called phases: still resumes
        state.setdefault("unfreeze_phase", state.pop("unfreeze_stage"))
    return state


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return read_state(path)
