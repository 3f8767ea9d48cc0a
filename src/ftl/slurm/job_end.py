"""`ftl slurm job-end`: what a job script does after training. A run that exited cleanly but did not
finish was stopped by the preemption/time-limit signal: requeue the job, whose restart resumes from the
checkpoint. A finished pipeline stage hands its model on; a failed one says which stage failed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.errors import FtlError
from ftl.pipeline import complete_stage
from ftl.slurm import jobs

MAX_REQUEUES = 20  # a run that keeps stopping without finishing is a bug, not a preemption


def run_finished(run_dir: Path) -> bool:
    manifest = run_dir / layout.MANIFEST_FILE
    return manifest.exists() and bool(json.loads(manifest.read_text()).get("finished"))


def job_end(code: int, recipe_path: str, profile: Optional[str], overrides: list[str]) -> int:
    run_dir = layout.run_dir_for(load_recipe(recipe_path, profile, overrides))
    job_id = os.environ.get("SLURM_JOB_ID")
    pipeline, stage = os.environ.get("FTL_PIPELINE"), os.environ.get("FTL_PIPELINE_STAGE")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if code == 0 and not run_finished(run_dir):
        if not job_id or restarts >= int(os.environ.get("FTL_MAX_REQUEUES", MAX_REQUEUES)):
            print(f"ftl slurm: run {run_dir} stopped unfinished and will not be requeued "
                  f"(restart {restarts}); resubmit to resume from its last checkpoint", flush=True)
            return 1
        print(f"ftl slurm: run {run_dir} stopped before the end (preemption or time limit): requeueing "
              f"job {job_id} to resume from its last checkpoint", flush=True)
        jobs.requeue(job_id)
        return 0
    if stage:
        if code != 0:
            print(f"ftl pipeline: stage '{stage}' failed (exit {code}); Slurm cancels the stages after it. "
                  f"Log: this file", flush=True)
            return code
        try:
            complete_stage(pipeline, profile, stage)
        except FtlError as err:
            print(f"ftl pipeline: stage '{stage}' failed after training: {err}", flush=True)
            return 1
    return code
