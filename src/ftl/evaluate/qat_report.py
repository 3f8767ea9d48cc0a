"""The end of a QAT run: convert to a really quantised model, save it, and compare with PTQ.

`compare_qat(recipe, run_dir, ...)` runs after the stage has saved `final/` (the fp32 QAT weights).
On the run's validation features it measures the eval loss of

  qat_fake_quant  the model as it trained (fake-quantised forward)
  qat_converted   the same weights really quantised by torchao's convert step (what you deploy)
  qat_fp32        the same weights with fake quantisation off (plain fp32 forward)
  plain_fp32      a plain fine-tune of the same recipe without QAT (the baseline)
  plain_ptq       that plain fine-tune post-training-quantised with the same config

plus the stored bytes of the quantised linear weights against fp32, and the largest logit difference
between converted and fake-quantised model (they should agree: convert applies the same rounding).

The baseline: by default the same stage runs again in `<run>/ptq_baseline/` on the same recipe with
method.qat disabled, starting from copies of this run's tokenizer and base weights: same data in the
same order, same settings, its own report and checkpoints (so --resume continues it). The comparison
is then like for like and needs nothing else, at twice the training time. `baseline_dir` (a plain
fine-tuned model folder, e.g. another run's `final/`) reuses an existing plain fine-tune instead.

Writes `qat.json` / `qat.md`, adds the qat_converted / plain_fp32 / plain_ptq columns to the run's
`eval.json` / `eval.md`, and saves the quantised model in `<run>/quantized/` (a transformers folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import torch

ROWS = ("qat_fake_quant", "qat_converted", "qat_fp32", "plain_fp32", "plain_ptq")
QUANTIZED_DIR = "quantized"
BASELINE_DIR = "ptq_baseline"
LOGIT_TOLERANCE = 1e-4  # converted vs fake-quantised logits (measured: 0.0 on CPU fp32)


def validation_features(recipe, tokenizer) -> list[dict]:
    """The validation features the sft stage evaluates on (same split, same cap, same encoding)."""
    from ftl.data import load_splits
    from ftl.data.tokenize import encode_records

    splits, _ = load_splits(recipe.data)
    return encode_records(tokenizer, splits.validation[: recipe.eval.max_examples], recipe.data)


def compare_qat(recipe, run_dir: Path, accelerator=None, resume: bool = False, baseline_dir: Optional[Path] = None,
                validation: Optional[list[dict]] = None) -> dict:
    """Run on every rank (evaluation is sharded); the main process writes the files.

    Returns {"interrupted", "summary", "rows"}; interrupted (a stop signal while the baseline trained)
    means `quantized/` is saved but the comparison is not: rerun with --resume to finish it."""
    from ftl import run_dir as layout
    from ftl.data.packing import collate
    from ftl.evaluate.lm import lm_loss
    from ftl.evaluate.report import render_table, write_report
    from ftl.methods import qat as q
    from ftl.models.load import load_tokenizer
    from ftl.train.distributed import is_sharded, make_accelerator

    run_dir = Path(run_dir)
    options = recipe.method.qat
    acc = accelerator or make_accelerator(recipe.train, recipe.launch)
    if is_sharded(acc):
        raise NotImplementedError("method.qat: the QAT/PTQ comparison needs whole models on each rank "
                                  "(not ZeRO-3 sharded ones)")
    main = acc.is_main_process
    tokenizer = load_tokenizer(recipe.model, saved=run_dir / layout.TOKENIZER_DIR)
    if validation is None:
        validation = validation_features(recipe, tokenizer)
    if not validation:
        raise ValueError("method.qat: the comparison needs validation data (data.split.validation > 0)")
    pad = tokenizer.pad_token_id

    def loss(model) -> dict:
        return lm_loss(model, validation, pad, recipe.eval.batch_size, acc)

    probe = {k: v.to(acc.device) for k, v in collate(validation[: recipe.eval.batch_size], pad).items()}
    rows: dict[str, dict] = {}

    # -- the QAT model, from the saved fp32 weights ------------------------------------------
    final = run_dir / layout.FINAL_DIR
    model = load_trained(recipe, final).to(acc.device)
    rows["qat_fp32"] = {**loss(model), **q.weight_bytes(model)}
    q.prepare(model, recipe.method)
    rows["qat_fake_quant"] = {**loss(model), **q.weight_bytes(model)}
    fake_logits = _logits(model, probe)
    q.convert(model, options)
    diff = (_logits(model, probe) - fake_logits).abs().max().item()
    rows["qat_converted"] = {**loss(model), **q.weight_bytes(model), "max_abs_logit_diff_vs_fake_quant": diff}
    del model, fake_logits
    if main:  # the deliverable first: a baseline interrupted below must not cost it
        q.save_quantized(final, run_dir / QUANTIZED_DIR, options, tokenizer, getattr(torch, recipe.model.dtype))
    acc.wait_for_everyone()

    # -- the plain baseline, then its PTQ ----------------------------------------------------
    plain, baseline = _plain_model(recipe, run_dir, acc, resume, baseline_dir)
    if plain is None:
        return {"interrupted": True, "summary": None, "rows": rows}
    rows["plain_fp32"] = {**loss(plain), **q.weight_bytes(plain)}
    q.ptq(plain, options)
    rows["plain_ptq"] = {**loss(plain), **q.weight_bytes(plain)}
    del plain

    rows = {name: rows[name] for name in ROWS}
    summary = _summary(rows, options, baseline)
    if main:
        summary["quantized_dir"] = str(run_dir / QUANTIZED_DIR)
        summary.update(_folder_bytes(final, run_dir / QUANTIZED_DIR))
        report = {"summary": summary, "rows": rows}
        (run_dir / "qat.json").write_text(json.dumps(report, indent=1))
        (run_dir / "qat.md").write_text(_markdown(summary, rows, render_table))
        eval_json = run_dir / layout.EVAL_FILE
        results = json.loads(eval_json.read_text()) if eval_json.exists() else {}
        results.update({k: rows[k] for k in ("qat_converted", "plain_fp32", "plain_ptq")})
        write_report(run_dir, results)
        print((run_dir / "qat.md").read_text(), flush=True)
    acc.wait_for_everyone()
    return {"interrupted": False, "summary": summary, "rows": rows}


def load_trained(recipe, folder: Path):
    """A fine-tuned causal LM from its folder, in the recipe's dtype (its weights, even for model.init scratch)."""
    from ftl.models.load import load_model

    return load_model(recipe.model.model_copy(update={"init": "pretrained", "gradient_checkpointing": False}), folder)


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits.float()
    model.train(was)
    return out


def _plain_model(recipe, run_dir: Path, acc, resume: bool, baseline_dir: Optional[Path]):
    """(plain fine-tuned fp32 model, where it came from); (None, ...) if its training was interrupted.

    The in-run baseline is the stage itself run again on the same recipe with method.qat disabled, in
    `<run>/ptq_baseline/`, starting from copies of this run's tokenizer and base weights: same data, same
    order, same settings, its own report, and --resume continues it like any run."""
    from ftl import run_dir as layout
    from ftl.runner import stage_function

    if baseline_dir is not None:
        return load_trained(recipe, Path(baseline_dir)).to(acc.device), str(baseline_dir)
    out = run_dir / BASELINE_DIR
    done = resume and (out / layout.FINAL_DIR / "config.json").exists() and (out / layout.EVAL_FILE).exists()
    if not done:
        if acc.is_main_process:
            if not resume:
                shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True, exist_ok=True)
            for name in (layout.TOKENIZER_DIR, "base"):  # identical starting point (tiny model: built per run)
                if (run_dir / name).exists() and not (out / name).exists():
                    shutil.copytree(run_dir / name, out / name)
        acc.wait_for_everyone()
        method = recipe.method.model_copy(update={"qat": recipe.method.qat.model_copy(update={"enabled": False})})
        plain = recipe.model_copy(update={"method": method})
        acc.print(f"ftl: method.qat: fine-tuning a plain copy of the recipe (no QAT) in {out} "
                  "for the post-training-quantisation baseline", flush=True)
        result = stage_function(recipe.stage)(plain, out, resume=resume)
        if result.get("interrupted"):
            return None, str(out)
    return load_trained(recipe, out / layout.FINAL_DIR).to(acc.device), f"trained in this run ({out})"


def _summary(rows: dict, options, baseline: str) -> dict:
    converted, ptq = rows["qat_converted"], rows["plain_ptq"]
    return {
        "scheme": f"weights {options.weight_dtype} (group {options.group_size}, symmetric)"
                  + (", activations int8 per token (dynamic)" if options.activations else ", activations fp32"),
        "baseline": baseline,
        "qat_converted_loss": converted["loss"],
        "plain_ptq_loss": ptq["loss"],
        "qat_minus_ptq_loss": converted["loss"] - ptq["loss"],
        "ptq_degradation": ptq["loss"] - rows["plain_fp32"]["loss"],
        "qat_degradation": converted["loss"] - rows["qat_fp32"]["loss"],
        "max_abs_logit_diff_vs_fake_quant": converted["max_abs_logit_diff_vs_fake_quant"],
        "linear_weight_bytes_quantized": converted["linear_weight_bytes"],
        "linear_weight_bytes_fp32": converted["linear_weight_bytes_fp32"],
        "linear_weight_compression": converted["linear_weight_bytes_fp32"] / max(converted["linear_weight_bytes"], 1),
    }


def _folder_bytes(fp32_dir: Path, quantized_dir: Path) -> dict:
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.safetensors"))  # noqa: E731
    return {"final_safetensors_bytes": size(fp32_dir), "quantized_safetensors_bytes": size(quantized_dir)}


def _markdown(summary: dict, rows: dict, render_table) -> str:
    s = summary
    better = "better" if s["qat_minus_ptq_loss"] < 0 else "worse"
    lines = [
        "# Quantization-aware fine-tuning vs post-training quantisation", "",
        f"Scheme: {s['scheme']}. Baseline: plain fine-tune {s['baseline']}.", "",
        f"- QAT, converted to real integers: eval loss {s['qat_converted_loss']:.4f}; plain fine-tune + PTQ: "
        f"{s['plain_ptq_loss']:.4f} (QAT {abs(s['qat_minus_ptq_loss']):.4f} {better}).",
        f"- Loss added by quantisation: PTQ {s['ptq_degradation']:+.4f} over plain fp32, QAT convert "
        f"{s['qat_degradation']:+.4f} over the same weights in fp32.",
        f"- Quantised linear weights: {s['linear_weight_bytes_quantized']:,} bytes vs "
        f"{s['linear_weight_bytes_fp32']:,} in fp32 ({s['linear_weight_compression']:.2f}x smaller: one int8 per "
        "weight (torchao's `unpacked_to_int8` layout, int4 values unpacked) plus an fp32 scale and int8 zero point "
        "per group). Output head and embeddings stay fp32.",
        f"- Converted vs fake-quantised logits: max |diff| {s['max_abs_logit_diff_vs_fake_quant']:.2e}.",
    ]
    if "quantized_safetensors_bytes" in s:
        lines.append(f"- On disk: `final/` {s['final_safetensors_bytes']:,} bytes (fp32), `quantized/` "
                     f"{s['quantized_safetensors_bytes']:,} bytes (load with `AutoModelForCausalLM.from_pretrained`).")
    return "\n".join(lines) + "\n\n" + render_table(rows)
