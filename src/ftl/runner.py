"""Run one recipe in this process: load it, check its run directory may be used as asked, look its stage
up in the stage table, run it; the run-directory lock is released however the run ends."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.config.schema import Recipe
from ftl.config.stages import STAGES
from ftl.data.hub import dataset_snapshot
from ftl.errors import FtlError
from ftl.models.load import hub_model
from ftl.run_dir import run_dir_for
from ftl.run_lock import release_all
from ftl.train.checkpoint import latest_checkpoint


def stage_function(stage: str):
    return STAGES[stage].run_function()


def earlier_run(run_dir: Path) -> Optional[str]:
    """What a fresh start would replace in run_dir: a finished run, or an unfinished one's checkpoints."""
    try:
        manifest = json.loads((run_dir / layout.MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("finished"):
        return f"a finished run ({manifest.get('steps')} steps, {layout.FINAL_DIR}/ holds its model)"
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        return f"an unfinished run with checkpoints up to {checkpoint.name}"
    return None


def check_run_folder(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise FtlError("--resume continues the run in the folder, --overwrite replaces it: choose one")
    if resume or overwrite:
        return
    found = earlier_run(run_dir)
    if found:
        raise FtlError(f"{run_dir} holds {found}: pass --resume to continue it, --overwrite to replace it (nothing "
                       "is removed before the new run's recipe and data validate), or choose another "
                       "track.output_dir")


def locate_hub_repos(recipe: Recipe) -> None:
    """Find (with network: fetch) a hub model and dataset before the stage imports torch (~7 s): offline, a
    missing one is refused here within a second."""
    if recipe.model.source == "hub":
        hub_model(recipe.model)
    for key, _, source in recipe.data.entries():  # data.source, data.sources, data.splits
        if source.kind == "hub":
            dataset_snapshot(source, key)


def run_recipe(path, profile=None, overrides=(), resume=False, run_dir=None, overwrite=False) -> dict:
    recipe = load_recipe(path, profile, list(overrides))
    target = Path(run_dir or run_dir_for(recipe))
    check_run_folder(target, resume, overwrite)
    locate_hub_repos(recipe)
    try:
        return stage_function(recipe.stage)(recipe, target, resume=resume)
    finally:
        release_all()
