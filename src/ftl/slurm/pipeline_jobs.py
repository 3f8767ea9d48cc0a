"""`ftl pipeline --slurm`: each stage that must run becomes a job depending (afterok) on the one
before; the job list is kept in the pipeline folder for `ftl slurm status|cancel PIPELINE_DIR`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

from ftl.pipeline import pipeline_root, plan_stages
from ftl.slurm.script import JobOptions
from ftl.slurm.submit import submit_recipe

JOBS_FILE = "slurm_jobs.json"


def submit_pipeline(path: str | Path, profile: Optional[str], options: JobOptions, force: bool = False,
                    dry_run: bool = False) -> dict[str, dict]:
    path = Path(path).resolve()
    spec, plans = plan_stages(path, profile, force)
    root = pipeline_root(spec, profile)
    submitted: dict[str, dict] = {}
    previous: Optional[str] = None
    for plan in plans:
        if plan.complete:
            print(f"ftl pipeline: stage '{plan.name}' unchanged and complete: no job ({plan.output})", flush=True)
            continue
        stage_options = dataclasses.replace(options, job_name=f"ftl-{spec.name}-{plan.name}")
        sub = submit_recipe(str(plan.recipe_path), profile, plan.overrides, stage_options, dry_run,
                            dependency=previous, show_script=False,
                            export={"FTL_PIPELINE": str(path), "FTL_PIPELINE_STAGE": plan.name,
                                    "FTL_OVERWRITE": "1"})  # the pipeline reruns this stage: replace it
        previous = sub.job_id or f"${plan.name}_job"
        submitted[plan.name] = {"job_id": sub.job_id, "script": str(sub.script),
                                "log": str(sub.log).replace("%x", stage_options.job_name)
                                .replace("%j", sub.job_id or "%j")}
    if not dry_run:
        root.mkdir(parents=True, exist_ok=True)
        (root / JOBS_FILE).write_text(json.dumps(submitted, indent=1))
        print(f"ftl pipeline: {len(submitted)} stage job(s) submitted; `ftl slurm status {root}`", flush=True)
    return submitted
