"""Thin wrappers over sbatch, scontrol and scancel (no accounting database needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Optional

from ftl.errors import LaunchError

FIELD = re.compile(r"(\w+)=(\S*)")
FIELDS = ("JobId", "JobName", "JobState", "Reason", "ExitCode", "Restarts", "NodeList", "StdOut")


def _slurm(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    if not shutil.which(argv[0]):
        raise LaunchError(f"{argv[0]} not found: Slurm's client commands must be on PATH")
    done = subprocess.run(argv, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise LaunchError(f"{' '.join(argv[:2])} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def sbatch_argv(script: Path, args: list[str], dependency: Optional[str] = None,
                export: Optional[dict[str, str]] = None) -> list[str]:
    argv = ["sbatch", "--parsable"]
    if dependency:  # a failed dependency cancels this job instead of leaving it pending forever
        argv += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    if export:
        argv.append("--export=" + ",".join(["ALL"] + [f"{k}={v}" for k, v in export.items()]))
    return argv + [str(script)] + list(args)


def submit(argv: list[str]) -> str:
    """Run an sbatch --parsable command line; the job id."""
    return _slurm(argv).stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """scontrol's view of a job (kept for MinJobAge after it ends); {} once Slurm forgot it."""
    done = _slurm(["scontrol", "show", "job", "-o", str(job_id)], check=False)
    if done.returncode != 0 or "JobId=" not in done.stdout:
        return {}
    fields = dict(FIELD.findall(done.stdout.splitlines()[0]))
    return {key: fields.get(key, "") for key in FIELDS}


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _slurm(["scancel"] + [str(j) for j in job_ids])


def requeue(job_id: str) -> None:
    _slurm(["scontrol", "requeue", str(job_id)])


def queue() -> str:
    return _slurm(["squeue", "-o", "%.10i %.30j %.9T %.10M %.6D %R"]).stdout
