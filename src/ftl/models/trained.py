"""Reload what a run trained: the final folder, on top of its base when the method saved an adapter."""

from __future__ import annotations

from pathlib import Path

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.errors import FtlError


def load_trained_causal_lm(run_dir: Path):
    """(model, tokenizer, recipe) from a finished run directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = Path(run_dir) / layout.FINAL_DIR
    if not final.is_dir():
        raise FtlError(f"{run_dir}: no '{layout.FINAL_DIR}' model (has the run finished?)")
    recipe = load_recipe(Path(run_dir) / layout.RECIPE_FILE)
    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").exists():
        from peft import PeftModel

        from ftl.models.load import load_causal_lm

        base = load_causal_lm(recipe.model, tokenizer, recipe.train.seed)
        model = PeftModel.from_pretrained(base, final)
    else:
        model = AutoModelForCausalLM.from_pretrained(final)
    model.config.use_cache = False
    return model.eval(), tokenizer, recipe
