"""The QAT report: measure a QAT model against a post-training-quantised plain one, and write it.

Measured on the run's validation features (eval loss), each row a model:

  qat_fake_quant  the model as it trained (fake-quantised forward)
  qat_converted   the same weights really quantised by torchao's convert step (what you deploy)
  qat_fp32        the same weights with fake quantisation off (plain fp32 forward)
  plain_fp32      a plain fine-tune of the same recipe without QAT (the baseline)
  plain_ptq       that plain fine-tune post-training-quantised with the same config

plus the stored bytes of the quantised linear weights against fp32, and the largest logit difference
between converted and fake-quantised model (they should agree: convert applies the same rounding).
This module only measures; the sft stage's end (ftl.stages.sft_qat) provides the models, including
training the plain baseline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from ftl import run_dir as layout
from ftl.evaluate.report import render_table, write_report
from ftl.methods import qat as q

ROWS = ("qat_fake_quant", "qat_converted", "qat_fp32", "plain_fp32", "plain_ptq")
LOGIT_TOLERANCE = 1e-4  # converted vs fake-quantised logits (measured: 0.0 on CPU fp32)

Loss = Callable[[torch.nn.Module], dict]


def measure_qat_model(model, method, loss: Loss, probe: dict) -> dict:
    """Rows qat_fp32, qat_fake_quant, qat_converted of the trained fp32 weights in `model`
    (prepared and then converted in place)."""
    rows = {"qat_fp32": {**loss(model), **q.weight_bytes(model)}}
    q.prepare(model, method)
    rows["qat_fake_quant"] = {**loss(model), **q.weight_bytes(model)}
    fake_logits = _logits(model, probe)
    q.convert(model, method.qat)
    diff = (_logits(model, probe) - fake_logits).abs().max().item()
    rows["qat_converted"] = {**loss(model), **q.weight_bytes(model), "max_abs_logit_diff_vs_fake_quant": diff}
    return rows


def measure_plain_model(plain, options, loss: Loss) -> dict:
    """Rows plain_fp32 and plain_ptq (quantised in place)."""
    rows = {"plain_fp32": {**loss(plain), **q.weight_bytes(plain)}}
    q.ptq(plain, options)
    rows["plain_ptq"] = {**loss(plain), **q.weight_bytes(plain)}
    return rows


def write_qat_report(run_dir: Path, rows: dict, options, baseline: str) -> dict:
    """qat.json / qat.md, and the qat_converted / plain_fp32 / plain_ptq columns added to eval.json / eval.md."""
    rows = {name: rows[name] for name in ROWS}
    summary = _summary(rows, options, baseline)
    summary["quantized_dir"] = str(run_dir / layout.QUANTIZED_DIR)
    summary.update(_folder_bytes(run_dir / layout.FINAL_DIR, run_dir / layout.QUANTIZED_DIR))
    (run_dir / f"{layout.QAT_REPORT}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    markdown = run_dir / f"{layout.QAT_REPORT}.md"
    markdown.write_text(_markdown(summary, rows))
    eval_json = run_dir / layout.EVAL_FILE
    results = json.loads(eval_json.read_text()) if eval_json.exists() else {}
    results.update({k: rows[k] for k in ("qat_converted", "plain_fp32", "plain_ptq")})
    write_report(run_dir, results)
    print(markdown.read_text(), flush=True)
    return summary


@torch.no_grad()
def _logits(model, batch: dict) -> torch.Tensor:
    was = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits.float()
    model.train(was)
    return out


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


def _markdown(summary: dict, rows: dict) -> str:
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
