"""Run one recipe in this process: load it, look its stage up in the stage table, run it in its run directory."""

from __future__ import annotations

from ftl.config import load_recipe
from ftl.config.stages import STAGES
from ftl.run_dir import run_dir_for


def stage_function(stage: str):
    return STAGES[stage].run_function()


def run_recipe(path, profile=None, overrides=(), resume=False, run_dir=None) -> dict:
    recipe = load_recipe(path, profile, list(overrides))
    target = run_dir or run_dir_for(recipe)
    return stage_function(recipe.stage)(recipe, target, resume=resume)
