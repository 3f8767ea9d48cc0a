"""Atomic checkpoints: written to a temporary folder, then renamed. Any `step-N` folder is complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ftl.run_dir import CHECKPOINTS_DIR

STATE_FILE = "trainer_state.json"


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / CHECKPOINTS_DIR


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = sorted(checkpoint_dir(run_dir).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    complete = [p for p in found if (p / STATE_FILE).exists()]
    return complete[-1] if complete else None


def save_checkpoint(accelerator, run_dir: Path, step: int, state: dict, keep: int) -> Path:
    root = checkpoint_dir(run_dir)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # every rank: DeepSpeed writes its own shards
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(root.glob("step-*"))[:-keep]:
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
