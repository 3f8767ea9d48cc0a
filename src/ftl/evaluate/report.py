"""eval.json plus a short human-readable table (eval.md), before vs after when both exist."""

from __future__ import annotations

import json
from pathlib import Path

from ftl import run_dir as layout

SCALARS = ("loss", "perplexity", "accuracy", "precision", "recall", "f1", "macro_f1", "tokens")


def write_report(out_dir: Path, results: dict[str, dict]) -> tuple[Path, Path]:
    """results: phase name ('before', 'after', ...) → metrics (+ optional 'samples')."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / layout.EVAL_FILE, out_dir / "eval.md"
    json_path.write_text(json.dumps(results, indent=1, ensure_ascii=False))
    md_path.write_text(render_table(results))
    return json_path, md_path


def render_table(results: dict[str, dict]) -> str:
    results = with_nested_phases(results)
    phases = list(results)
    extra = [k for p in phases for k, v in results[p].items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in SCALARS]
    keys = [k for k in SCALARS if any(k in results[p] for p in phases)] + list(dict.fromkeys(extra))
    lines = ["| metric | " + " | ".join(phases) + " |", "|---" * (len(phases) + 1) + "|"]
    for key in keys:
        cells = [_fmt(results[p].get(key)) for p in phases]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    confused = [p for p in phases if results[p].get("confusion_matrix")]
    if confused:
        lines += ["", "## Confusion matrix (rows: true label, columns: predicted)", ""]
        for p in confused:
            lines += [f"**{p}**", "", confusion_table(results[p]["confusion_matrix"], results[p]["classes"]), ""]
    sampled = [p for p in phases if results[p].get("samples")]
    if sampled:
        lines += ["", "## Generations", ""]
        for i, first in enumerate(results[sampled[0]]["samples"]):
            lines.append(f"**Prompt {i + 1}:** {first['prompt'][-300:]!r}")
            if first.get("reference"):
                lines.append(f"- reference: {first['reference']}")
            for p in sampled:
                lines.append(f"- {p}: {results[p]['samples'][i]['generation']}")
            lines.append("")
    return "\n".join(lines) + "\n"


def with_nested_phases(results: dict[str, dict]) -> dict[str, dict]:
    """Metrics nested in a phase (e.g. after → test) become phases of their own ('after/test')."""
    out = {}
    for phase, metrics in results.items():
        out[phase] = metrics
        for key, value in metrics.items():
            if isinstance(value, dict) and any(isinstance(v, (int, float)) for v in value.values()):
                out[f"{phase}/{key}"] = value
    return out


def confusion_table(matrix: list[list[int]], classes: list) -> str:
    lines = ["| true \\ predicted | " + " | ".join(map(str, classes)) + " |", "|---" * (len(classes) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(map(str, row)) + " |" for name, row in zip(classes, matrix)]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
