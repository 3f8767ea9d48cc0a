"""`ftl compare`: one recipe under several variants (methods, pretrained vs from scratch) on the same data,
steps and evaluation, and one report: trainable share, peak memory, wall time, steps to reach a target
validation metric, final validation and test metric — plus one plot of the validation curves.

Peak memory is the run's own figure from its manifest (ftl.track.memory): measured inside each rank (CPU:
the resident-set high-water mark; GPU: torch.cuda.max_memory_allocated), the max over ranks, next to what
`ftl plan` planned for it. That is what a device must hold and what the plan predicts; the launched process
tree's high-water mark (os.wait4) is kept in compare.json as `tree_peak_rss_mb`: on CPU it agrees with the
largest rank (the launcher itself is smaller), on GPU it says nothing about device memory."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Optional

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.config.schema import CompareConfig
from ftl.errors import FtlError, RecipeError
from ftl.launch.command import build_launch_command, runnable
from ftl.track.metrics import read_metrics

REPORT, PLOT = "compare.md", "compare.png"


def run_compare(recipe_path: str, profile: Optional[str], overrides: list[str], only: Optional[list[str]] = None,
                out: Optional[str] = None) -> Path:
    recipe = load_recipe(recipe_path, profile, overrides)
    cfg = recipe.compare
    variants = {name: v for name, v in cfg.variants.items() if not only or name in only}
    if not variants:
        raise RecipeError(f"{recipe_path}: compare.variants has no variant to run "
                          f"(defined: {sorted(cfg.variants)}, asked: {only or 'all'})")
    metric = cfg.target_metric or "loss"
    root = Path(out or f"runs/compare-{recipe.name}-{recipe.profile or 'base'}")
    root.mkdir(parents=True, exist_ok=True)
    planned = {}  # every variant is checked before any runs: a typo in the last one costs nothing
    for name, variant in variants.items():
        run_overrides = list(overrides) + list(variant) + [f"track.output_dir={root / name}"]
        try:
            planned[name] = (load_recipe(recipe_path, profile, run_overrides), run_overrides)
        except RecipeError as err:
            raise RecipeError(f"compare.variants.{name}: {err}") from None
    rows = []
    for name, (variant_recipe, run_overrides) in planned.items():
        measured_file = root / f"{name}.json"
        measured = reusable_measurement(measured_file, run_overrides, root / name)
        if measured is None:
            command = build_launch_command(variant_recipe, recipe_path, run_overrides, overwrite=True)  # re-measure
            print(f"ftl compare: {name}: {command.shell()}", flush=True)
            measured = run_variant(name, runnable(command), root)
            write_atomic(measured_file, json.dumps({"overrides": run_overrides, **measured}, indent=1))
        else:
            print(f"ftl compare: {name}: measured earlier with the same overrides, reusing {measured_file}",
                  flush=True)
        rows.append(summarise(name, root / name, metric, cfg, lr=variant_recipe.train.lr, **measured))
        print(f"ftl compare: {name}: {rows[-1]}", flush=True)
    (root / "compare.json").write_text(json.dumps(rows, indent=1))
    plot = plot_validation(rows, root, metric)
    report = root / REPORT
    report.write_text(render(rows, recipe.name, recipe.profile, metric, cfg, plot))
    print(report.read_text(), flush=True)
    print(f"ftl compare: report {report}", flush=True)
    return report


def run_variant(name: str, argv_env, root: Path) -> dict:
    """Run one variant; its wall time and peak memory (what cannot be recomputed from the run folder)."""
    log = root / f"{name}.log"
    started = time.time()
    code, peak_kb = run_measured(argv_env, log)
    seconds = time.time() - started
    if code != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
        raise FtlError(f"compare: variant '{name}' failed (exit {code}); log {log}\n{tail}")
    return {"seconds": seconds, "peak_kb": peak_kb}


def reusable_measurement(measured_file: Path, run_overrides: list[str], run_dir: Path) -> Optional[dict]:
    """A variant finished by an earlier (killed or failed) compare is not run again: its measurement is
    kept per variant and reused only when the variant ran with exactly the same overrides and its run
    folder still holds the finished run."""
    manifest = run_dir / layout.MANIFEST_FILE  # `finished` is written after the run's eval.json
    if not (measured_file.exists() and manifest.exists()):
        return None
    saved = json.loads(measured_file.read_text())
    if saved.get("overrides") != run_overrides or not json.loads(manifest.read_text()).get("finished"):
        return None
    return {"seconds": saved["seconds"], "peak_kb": saved["peak_kb"]}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_measured(argv_env, log: Path) -> tuple[int, int]:
    """Exit code and peak resident memory (KiB) of the launched process tree's largest process."""
    argv, env = argv_env
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own usage, its waited-for children included
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    return proc.returncode, usage.ru_maxrss


def summarise(name: str, run_dir: Path, metric: str, cfg: CompareConfig, lr: float, seconds: float,
              peak_kb: int) -> dict:
    manifest = json.loads((run_dir / layout.MANIFEST_FILE).read_text())
    report = json.loads((run_dir / layout.EVAL_FILE).read_text())
    before, after = report.get("before") or {}, report["after"]
    curve = [(r["step"], r[f"eval/{metric}"]) for r in read_metrics(run_dir / layout.METRICS_FILE)
             if f"eval/{metric}" in r]
    if metric in before:  # the curve runs from the untrained model to the final evaluation
        curve.insert(0, (0, before[metric]))
    if metric in after and (not curve or curve[-1][0] != manifest["steps"]):
        curve.append((manifest["steps"], after[metric]))
    trainable = manifest.get("trainable", {})
    finals = {column: (after if split == "validation" else after.get("test") or {}).get(m)
              for column, split, m in final_columns(metric, cfg)}
    memory = manifest.get("memory") or {}
    planned = (memory.get("planned") or {}).get("peak_bytes")
    return {"variant": name, "lr": lr, "trainable_params": trainable.get("trainable_params"),
            "trainable_share": trainable.get("trainable_share"),
            "peak_mb": round((memory.get("peak_bytes") or peak_kb * 1024) / 2**20),
            "peak_measure": memory.get("measure", "launched process tree RSS (os.wait4)"),
            "planned_mb": round(planned / 2**20) if planned else None, "tree_peak_rss_mb": round(peak_kb / 1024),
            "checkpointing": (manifest.get("gradient_checkpointing") or {}).get("on"),
            "seconds": round(seconds, 1), "steps_to_target": steps_to_target(curve, cfg), **finals,
            "curve": curve}


def final_columns(metric: str, cfg: CompareConfig) -> list[tuple[str, str, str]]:
    """(column, split, metric) of the final metrics in the table: the target metric, then the extras."""
    return [(f"{split}_{m}", split, m) for m in [metric, *cfg.extra_metrics] for split in ("validation", "test")]


def steps_to_target(curve: list[tuple[int, float]], cfg: CompareConfig) -> Optional[int]:
    if cfg.target_value is None:
        return None
    reached = (lambda v: v >= cfg.target_value) if cfg.target_mode == "max" else (lambda v: v <= cfg.target_value)
    return next((step for step, value in curve if reached(value)), None)


def render(rows: list[dict], name: str, profile: Optional[str], metric: str, cfg: CompareConfig,
           plot: Optional[Path]) -> str:
    target = f"{metric} {'≥' if cfg.target_mode == 'max' else '≤'} {cfg.target_value}" \
        if cfg.target_value is not None else "no target set"
    finals = [column for column, _, _ in final_columns(metric, cfg)]
    measures = sorted({r["peak_measure"] for r in rows})
    lines = [f"# Compare: {name} ({profile or 'base'})", "",
             f"Same data, steps and evaluation for every variant. Steps to target: first evaluation with {target}.",
             f"Peak memory: measured in each run's own processes ({'; '.join(measures)}), max over ranks; "
             "planned: `ftl plan` for the run's data.",
             "", "| variant | lr | trainable params | trainable % | peak memory (MB) | planned (MB) | wall (s) | "
                 "steps to target | " + " | ".join(f.replace("_", " ") for f in finals) + " |",
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(finals)]
    for r in rows:
        share = f"{100 * r['trainable_share']:.2f}" if r["trainable_share"] is not None else "-"
        reached = r["steps_to_target"] if r["steps_to_target"] is not None else "not reached"
        lines.append(f"| {r['variant']} | {r['lr']:g} | {r['trainable_params'] or 0:,} | {share} | "
                     f"{r['peak_mb']} | {_fmt(r.get('planned_mb'))} | {r['seconds']} | {reached} | "
                     + " | ".join(_fmt(r.get(f)) for f in finals) + " |")
    if plot:
        lines += ["", f"![validation {metric}]({plot.name})"]
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-" if value is None else str(value)


def plot_validation(rows: list[dict], root: Path, metric: str) -> Optional[Path]:
    if not any(r["curve"] for r in rows):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r["curve"]:
            ax.plot(*zip(*r["curve"]), "o-", label=r["variant"])
    ax.set_xlabel("step")
    ax.set_ylabel(f"validation {metric}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(root / PLOT, dpi=100)
    plt.close(fig)
    return root / PLOT
