"""`ftl slurm submit`: render a recipe's job script, print it, submit it, say where its log goes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftl.config import load_recipe
from ftl.run_dir import run_dir_for
from ftl.slurm import jobs
from ftl.slurm.script import JobOptions, render

SCRIPT_DIR = "slurm"  # inside the run directory: the rendered script and the job's log


@dataclass
class Submission:
    script: Path
    log: Path                   # with %x/%j as Slurm fills them in
    sbatch: list[str]
    text: str
    job_id: Optional[str] = None


def prepare(recipe_path: str, profile: Optional[str], overrides: list[str], options: JobOptions,
            dependency: Optional[str] = None, export: Optional[dict[str, str]] = None) -> Submission:
    device = load_recipe(recipe_path, profile, overrides).launch.device
    overrides = list(overrides) + options.recipe_overrides(device)
    recipe = load_recipe(recipe_path, profile, overrides)
    from ftl.models.attention import check_attention  # local: the method table imports torch (~7 s)

    check_attention(recipe)  # refused at submission, not after the queue wait
    workdir = Path.cwd()
    log_dir = (workdir / run_dir_for(recipe) / SCRIPT_DIR).resolve()
    text = render(recipe, options, log_dir, workdir)
    script = log_dir / f"{recipe.name}-{recipe.profile or 'base'}.sbatch"
    args = [str(recipe_path), profile or ""] + overrides
    return Submission(script, log_dir / "%x-%j.out", jobs.sbatch_argv(script, args, dependency, export), text)


def submit_recipe(recipe_path: str, profile: Optional[str], overrides: list[str], options: JobOptions,
                  dry_run: bool = False, dependency: Optional[str] = None,
                  export: Optional[dict[str, str]] = None, show_script: bool = True) -> Submission:
    sub = prepare(recipe_path, profile, overrides, options, dependency, export)
    if show_script:
        print(f"# {sub.script}\n{sub.text}", flush=True)
    print(f"ftl slurm: {' '.join(sub.sbatch)}", flush=True)
    if dry_run:
        return sub
    sub.script.parent.mkdir(parents=True, exist_ok=True)
    sub.script.write_text(sub.text)
    sub.job_id = jobs.submit(sub.sbatch)
    log = str(sub.log).replace("%j", sub.job_id)
    print(f"ftl slurm: submitted job {sub.job_id}; log {log} (%x = job name); "
          f"`ftl slurm status {sub.job_id}`", flush=True)
    return sub
