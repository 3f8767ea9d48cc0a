"""The end of a QAT sft run: convert to a really quantised model, save it, and compare with PTQ.

`compare_qat` runs after the stage has saved `final/` (the fp32 QAT weights); the rows and report are
ftl.evaluate.qat_report's. The baseline: by default the same stage runs again in `<run>/ptq_baseline/`
on the same recipe with method.qat disabled, starting from copies of this run's tokenizer and base
weights: same data in the same order, same settings, its own report and checkpoints (so --resume
continues it). The comparison is then like for like and needs nothing else, at twice the training
time. `baseline_dir` (a plain fine-tuned model folder, e.g. another run's `final/`) reuses an existing
plain fine-tune instead. The quantised model is saved in `<run>/quantized/` (a transformers folder).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from ftl import run_dir as layout
from ftl.config.stages import STAGES
from ftl.data import load_splits
from ftl.data.packing import collate
from ftl.data.tokenize import encode_records
from ftl.errors import RecipeError
from ftl.evaluate.lm import lm_loss
from ftl.evaluate.qat_report import measure_plain_model, measure_qat_model, write_qat_report
from ftl.methods import qat as q
from ftl.models.load import load_model, load_tokenizer
from ftl.train.distributed import is_sharded, make_accelerator


def validation_features(recipe, tokenizer) -> list[dict]:
    """The validation features the sft stage evaluates on (same split, same cap, same encoding)."""
    splits, _ = load_splits(recipe.data)
    return encode_records(tokenizer, splits.validation[: recipe.eval.max_examples], recipe.data)


def compare_qat(recipe, run_dir: Path, accelerator=None, resume: bool = False, baseline_dir: Optional[Path] = None,
                validation: Optional[list[dict]] = None) -> dict:
    """Run on every rank (evaluation is sharded); the main process writes the files.

    Returns {"interrupted", "summary", "rows"}; interrupted (a stop signal while the baseline trained)
    means `quantized/` is saved but the comparison is not: rerun with --resume to finish it."""
    run_dir = Path(run_dir)
    options = recipe.method.qat
    acc = accelerator or make_accelerator(recipe.train, recipe.launch)
    if is_sharded(acc):
        raise RecipeError("method.qat: the QAT/PTQ comparison needs whole models on each rank "
                          "(not ZeRO-3 sharded ones)")
    tokenizer = load_tokenizer(recipe.model, saved=run_dir / layout.TOKENIZER_DIR)
    if validation is None:
        validation = validation_features(recipe, tokenizer)
    if not validation:
        raise RecipeError("method.qat: the comparison needs validation data (data.split.validation > 0)")
    pad = tokenizer.pad_token_id

    def loss(model) -> dict:
        return lm_loss(model, validation, pad, recipe.eval.batch_size, acc, recipe.train.loss_chunk_tokens)

    probe = {k: v.to(acc.device) for k, v in collate(validation[: recipe.eval.batch_size], pad).items()}
    final = run_dir / layout.FINAL_DIR
    rows = measure_qat_model(load_trained(recipe, final).to(acc.device), recipe.method, loss, probe)
    if acc.is_main_process:  # the deliverable first: a baseline interrupted below must not cost it
        q.save_quantized(final, run_dir / layout.QUANTIZED_DIR, options, tokenizer, getattr(torch, recipe.model.dtype))
    acc.wait_for_everyone()

    plain, baseline = _plain_model(recipe, run_dir, acc, resume, baseline_dir)
    if plain is None:
        return {"interrupted": True, "summary": None, "rows": rows}
    rows.update(measure_plain_model(plain, options, loss))
    del plain
    summary = write_qat_report(run_dir, rows, options, baseline) if acc.is_main_process else None
    acc.wait_for_everyone()
    return {"interrupted": False, "summary": summary, "rows": rows}


def load_trained(recipe, folder: Path):
    """A fine-tuned causal LM from its folder, in the recipe's dtype (its weights, even for model.init scratch)."""
    return load_model(recipe.model.model_copy(update={"init": "pretrained", "gradient_checkpointing": False}), folder)


def _plain_model(recipe, run_dir: Path, acc, resume: bool, baseline_dir: Optional[Path]):
    """(plain fine-tuned fp32 model, where it came from); (None, ...) if its training was interrupted.

    The in-run baseline is the stage itself run again on the same recipe with method.qat disabled, in
    `<run>/ptq_baseline/`, starting from copies of this run's tokenizer and base weights: same data, same
    order, same settings, its own report, and --resume continues it like any run."""
    if baseline_dir is not None:
        return load_trained(recipe, Path(baseline_dir)).to(acc.device), str(baseline_dir)
    out = run_dir / layout.QAT_BASELINE_DIR
    done = resume and (out / layout.FINAL_DIR / "config.json").exists() and (out / layout.EVAL_FILE).exists()
    if not done:
        if acc.is_main_process:
            if not resume:
                shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            for name in (layout.TOKENIZER_DIR, layout.BASE_DIR):  # identical starting point (tiny model: built per run)
                if (run_dir / name).exists() and not (out / name).exists():
                    shutil.copytree(run_dir / name, out / name)
        acc.wait_for_everyone()
        method = recipe.method.model_copy(update={"qat": recipe.method.qat.model_copy(update={"enabled": False})})
        plain = recipe.model_copy(update={"method": method})
        acc.print(f"ftl: method.qat: fine-tuning a plain copy of the recipe (no QAT) in {out} "
                  "for the post-training-quantisation baseline", flush=True)
        result = STAGES[recipe.stage].run_function()(plain, out, resume=resume)
        if result.get("interrupted"):
            return None, str(out)
    return load_trained(recipe, out / layout.FINAL_DIR).to(acc.device), f"trained in this run ({out})"
