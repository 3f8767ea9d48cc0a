"""`ftl merge`: fold a trained adapter into its base and save a normal model folder.

QLoRA and 8-bit LoRA adapters are merged into the *de-quantised* base (in the compute dtype), never
into re-quantised weights: the LoRA update is far smaller than the 4-bit rounding step and would be
lost or distorted.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.errors import FtlError
from ftl.methods import METHODS
from ftl.models.load import base_model_dir, load_model


def merge_run(run_dir: Path, out: Optional[Path] = None, dtype: Optional[str] = None) -> Path:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    run_dir = Path(run_dir)
    if not (run_dir / layout.RECIPE_FILE).is_file():
        raise FtlError(f"{run_dir}: not a run directory (no {layout.RECIPE_FILE})")
    recipe = load_recipe(run_dir / layout.RECIPE_FILE)
    kind = recipe.method.kind
    if not METHODS[kind].mergeable:
        mergeable = sorted(k for k, info in METHODS.items() if info.mergeable)
        raise FtlError(f"{run_dir}: method '{kind}' has nothing to merge (mergeable: {mergeable}); "
                       f"the model in {run_dir / layout.FINAL_DIR} is already what to load")
    final = run_dir / layout.FINAL_DIR
    if not final.is_dir():
        raise FtlError(f"{final}: no trained model to merge (has the run finished?)")
    tokenizer = AutoTokenizer.from_pretrained(final)
    bits = METHODS[kind].quant_bits
    head = "sequence_classification" if recipe.stage == "reward" else "causal_lm"
    base = load_model(recipe.model, base_model_dir(recipe.model, tokenizer, recipe.train.seed, run_dir),
                      bits, recipe.method.quant, head=head)
    target_dtype = getattr(torch, dtype or (recipe.method.quant.compute_dtype if bits else recipe.model.dtype))
    if bits:
        base = base.dequantize()  # the weights the adapter was trained against, now plain Linear layers
    base = base.to(target_dtype)
    merged = PeftModel.from_pretrained(base, final).merge_and_unload()
    merged.config.use_cache = True
    target = Path(out) if out else run_dir / layout.MERGED_DIR
    partial = layout.partial(target)
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return target
