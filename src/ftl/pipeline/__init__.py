"""`ftl pipeline`: run stages in order (e.g. SFT → reward model → PPO), handing each stage's model to
the next. A stage whose recipe and inputs are unchanged and whose output is complete is skipped; a
failed stage stops the pipeline with its name and log.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ftl import run_dir as layout
from ftl.config import load_recipe, resolved_dict
from ftl.config.schema import Recipe
from ftl.errors import FtlError, RecipeError
from ftl.launch.command import build_launch_command, runnable
from ftl.pipeline.policies import policies_table

STAGE_FILE = "stage.json"


class PipelineError(FtlError):
    """A pipeline file is invalid or one of its stages failed."""


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    recipe: str
    inputs: dict[str, str] = {}        # dotted recipe key ← name of an earlier stage (its model output)
    overrides: list[str] = []


class PipelineSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    output_dir: str = "runs/{name}-{profile}"
    stages: list[StageSpec]
    judge: Optional[str] = None        # a reward stage whose model re-scores every policy stage (ftl.pipeline.policies)


def load_pipeline(path: Path) -> PipelineSpec:
    try:
        spec = PipelineSpec.model_validate(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, ValidationError) as err:
        raise PipelineError(f"{path}: invalid pipeline: {err}") from None
    seen: set[str] = set()
    for stage in spec.stages:
        for key, source in stage.inputs.items():
            if source not in seen:
                raise PipelineError(f"{path}: stage '{stage.name}' input {key} ← '{source}': no earlier stage "
                                    f"of that name (earlier: {sorted(seen) or 'none'})")
        seen.add(stage.name)
    if spec.judge is not None:
        judge = next((st for st in spec.stages if st.name == spec.judge), None)
        if judge is None:
            raise PipelineError(f"{path}: judge '{spec.judge}': no stage of that name (stages: {sorted(seen)})")
    return spec


def model_output(stage_dir: Path, method_kind: str) -> Path:
    """Where a finished stage's usable model is: final/ (full models) or merged/ (adapters)."""
    return stage_dir / (layout.FINAL_DIR if method_kind in ("full",) else layout.MERGED_DIR)


def fingerprint(resolved: dict, inputs: dict[str, str]) -> str:
    payload = json.dumps({"recipe": resolved, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def is_complete(stage_dir: Path, expected: str) -> bool:
    marker = stage_dir / STAGE_FILE
    if not marker.exists():
        return False
    state = json.loads(marker.read_text())
    return state.get("fingerprint") == expected and Path(state.get("output", "")).exists()


@dataclass
class StagePlan:
    name: str
    recipe_path: Path
    recipe: Recipe
    overrides: list[str]
    stage_dir: Path
    output: Path
    fingerprint: str
    complete: bool           # unchanged since it last completed: nothing to run


def pipeline_root(spec: PipelineSpec, profile: Optional[str]) -> Path:
    return Path(spec.output_dir.format(name=spec.name, profile=profile or "base"))


def plan_stages(path: Path, profile: Optional[str], force: bool = False) -> tuple[PipelineSpec, list[StagePlan]]:
    """Every stage's recipe, run directory and output, and whether it is already done."""
    spec = load_pipeline(path)
    root = pipeline_root(spec, profile)
    outputs: dict[str, Path] = {}
    prints: dict[str, str] = {}
    plans = []
    for stage in spec.stages:
        stage_dir = root / stage.name
        recipe_path = path.parent / stage.recipe
        overrides = [f"track.output_dir={stage_dir}"] + list(stage.overrides) + \
            [f"{key}={outputs[source]}" for key, source in stage.inputs.items()]
        try:
            recipe = load_recipe(recipe_path, profile, overrides)
            if recipe.track.wandb.enabled and recipe.track.wandb.group is None:  # W&B: the stages in one group
                overrides.append(f"track.wandb.group={root.name}")
                recipe = load_recipe(recipe_path, profile, overrides)
        except RecipeError as err:
            raise PipelineError(f"stage '{stage.name}': {err}") from None
        expected = fingerprint(resolved_dict(recipe), {k: prints[s] for k, s in stage.inputs.items()})
        output = model_output(stage_dir, recipe.method.kind)
        prints[stage.name], outputs[stage.name] = expected, output
        complete = not force and is_complete(stage_dir, expected)
        # a rerun stage invalidates the ones after it through their input fingerprints
        plans.append(StagePlan(stage.name, recipe_path, recipe, overrides, stage_dir, output, expected, complete))
    return spec, plans


def run_pipeline(path: str | Path, profile: Optional[str] = None, force: bool = False) -> dict:
    path = Path(path)
    spec, plans = plan_stages(path, profile, force)
    root = pipeline_root(spec, profile)
    root.mkdir(parents=True, exist_ok=True)
    summary = []
    for plan in plans:
        if plan.complete:
            print(f"ftl pipeline: stage '{plan.name}' unchanged and complete: skipped ({plan.output})", flush=True)
            summary.append({"stage": plan.name, "status": "skipped", "output": str(plan.output)})
            continue
        started = time.time()
        # the stage changed or never completed: its folder's old run is replaced once the new one validates
        command = build_launch_command(plan.recipe, str(plan.recipe_path), plan.overrides, overwrite=True)
        print(f"ftl pipeline: stage '{plan.name}' running: {command.shell()}", flush=True)
        log = root / f"{plan.name}.log"
        code = run_logged(runnable(command), log)
        if code == 0:
            code = finish_stage(plan, log, seconds=round(time.time() - started, 1))
        if code != 0 or not plan.output.exists():
            tail = "".join(log.read_text(errors="replace").splitlines(True)[-15:])
            raise PipelineError(f"stage '{plan.name}' failed (exit {code}); later stages not run. "
                                f"Log: {log}\n{tail}")
        summary.append({"stage": plan.name, "status": "ran", "seconds": round(time.time() - started, 1),
                        "output": str(plan.output)})
    judge_stages(spec, plans)
    report = write_pipeline_report(root, spec, summary)
    print(f"ftl pipeline: done; report {report}", flush=True)
    return {"root": str(root), "stages": summary, "report": str(report)}


def finish_stage(plan: StagePlan, log: Optional[Path] = None, seconds: Optional[float] = None) -> int:
    """After a stage trained: merge its adapter when the next stage needs a whole model, then mark it
    complete (recipe + inputs fingerprint) so an unchanged rerun skips it. `seconds`: its wall time, for
    the report."""
    code = 0
    if plan.output.name == layout.MERGED_DIR:
        code = run_logged(([sys.executable, "-m", "ftl", "merge", str(plan.stage_dir)], None), log, append=True)
    if code == 0 and plan.output.exists():
        (plan.stage_dir / STAGE_FILE).write_text(json.dumps({"fingerprint": plan.fingerprint,
                                                             "output": str(plan.output), "seconds": seconds}))
    return code if code else (0 if plan.output.exists() else 1)


def judge_stages(spec: PipelineSpec, plans: list[StagePlan]) -> None:
    if spec.judge is not None:
        from ftl.pipeline.policies import judge_policies

        judge_policies(plans, next(p for p in plans if p.name == spec.judge))


def complete_stage(path: str | Path, profile: Optional[str], name: str) -> None:
    """finish_stage for one stage of a pipeline run as Slurm jobs (called by the stage's own job)."""
    spec, plans = plan_stages(Path(path), profile, force=True)
    plan = next((p for p in plans if p.name == name), None)
    if plan is None:
        raise PipelineError(f"{path}: no stage named '{name}'")
    if finish_stage(plan) != 0:
        raise PipelineError(f"stage '{name}': no model at {plan.output} after training")
    print(f"ftl pipeline: stage '{name}' complete: {plan.output}", flush=True)
    if plan is plans[-1]:
        judge_stages(spec, plans)
        summary = [{"stage": p.name, "status": "ran as a Slurm job", "output": str(p.output)} for p in plans]
        print(f"ftl pipeline: done; report {write_pipeline_report(pipeline_root(spec, profile), spec, summary)}")


def run_logged(argv_env, log: Optional[Path], append: bool = False) -> int:
    """Run with output to `log` (None: this process's own output, e.g. a Slurm job's log)."""
    argv, env = argv_env
    if log is None:
        return subprocess.run(argv, env=env or os.environ).returncode
    with log.open("a" if append else "w") as out:
        return subprocess.run(argv, env=env or os.environ, stdout=out, stderr=subprocess.STDOUT).returncode


def write_pipeline_report(root: Path, spec: PipelineSpec, summary: list[dict]) -> Path:
    lines = [f"# Pipeline {spec.name}", "", "| stage | status | seconds | output |", "|---|---|---|---|"]
    for row in summary:
        lines.append(f"| {row['stage']} | {row['status']} | {row.get('seconds', '-')} | {row['output']} |")
    for stage in spec.stages:
        eval_md, plot = root / stage.name / "eval.md", root / stage.name / layout.PLOT_FILE
        if eval_md.exists():
            lines += ["", f"## {stage.name}", "", eval_md.read_text()]
        if plot.exists():
            lines += [f"![{stage.name} curves]({stage.name}/{layout.PLOT_FILE})", ""]
    lines += policies_table(root, [stage.name for stage in spec.stages])
    report = root / "pipeline_report.md"
    report.write_text("\n".join(lines) + "\n")
    return report
