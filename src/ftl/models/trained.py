"""Reload what a run trained: the final folder, on top of its base when the method saved an adapter."""

from __future__ import annotations

from pathlib import Path

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.errors import FtlError
from ftl.methods import METHODS, load_trained
from ftl.models.load import base_model_dir, load_model


def load_trained_causal_lm(run_dir: Path):
    """(model, tokenizer, recipe) from a finished run directory, in eval mode."""
    from transformers import AutoTokenizer

    final = Path(run_dir) / layout.FINAL_DIR
    if not final.is_dir():
        raise FtlError(f"{run_dir}: no '{layout.FINAL_DIR}' model (has the run finished?)")
    recipe = load_recipe(Path(run_dir) / layout.RECIPE_FILE)
    tokenizer = AutoTokenizer.from_pretrained(final)
    model = load_trained_model(recipe, Path(run_dir), tokenizer)
    model.config.use_cache = False
    return model.eval(), tokenizer, recipe


def load_trained_model(recipe, run_dir: Path, tokenizer, quantised_base: bool = True):
    """The run's final model; for adapter methods the base (quantised as trained, unless told not to)
    with the adapter loaded on top."""
    from transformers import AutoModelForCausalLM

    final = run_dir / layout.FINAL_DIR
    if recipe.method.kind == "full":
        return AutoModelForCausalLM.from_pretrained(final)
    bits = METHODS[recipe.method.kind].quant_bits if quantised_base else None
    base = load_model(recipe.model, base_model_dir(recipe.model, tokenizer, recipe.train.seed, run_dir),
                      bits, recipe.method.quant)
    return load_trained(base, final, recipe.method)
