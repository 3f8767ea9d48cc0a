"""Run one recipe in this process: load it, pick its stage, run it in its run directory."""

from __future__ import annotations

from ftl.config import load_recipe
from ftl.run_dir import run_dir_for

STAGES = {"sft": "ftl.stages.sft:run_sft", "reward": "ftl.stages.reward:run_reward",
          "ppo": "ftl.stages.ppo:run_ppo", "dpo": "ftl.stages.dpo:run_dpo",
          "grpo": "ftl.stages.grpo:run_grpo", "classify": "ftl.stages.classify:run_classify",
          "upft": "ftl.stages.upft:run_upft"}


def stage_function(stage: str):
    import importlib

    module, name = STAGES[stage].split(":")
    return getattr(importlib.import_module(module), name)


def run_recipe(path, profile=None, overrides=(), resume=False, run_dir=None) -> dict:
    recipe = load_recipe(path, profile, list(overrides))
    target = run_dir or run_dir_for(recipe)
    return stage_function(recipe.stage)(recipe, target, resume=resume)
