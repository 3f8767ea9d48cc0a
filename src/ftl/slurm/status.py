"""`ftl slurm status|cancel`: jobs by id, or a pipeline's stage jobs by its folder."""

from __future__ import annotations

import json
from pathlib import Path

from ftl.errors import FtlError
from ftl.slurm import jobs
from ftl.slurm.pipeline_jobs import JOBS_FILE

FAILED = {"FAILED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def targets(args: list[str]) -> list[tuple[str, str, str]]:
    """(label, job id, log) for job ids and pipeline folders."""
    out = []
    for arg in args:
        record = Path(arg) / JOBS_FILE
        if record.exists():
            for stage, job in json.loads(record.read_text()).items():
                out.append((f"stage '{stage}'", job["job_id"], job["log"]))
        elif arg.isdigit():
            out.append((f"job {arg}", arg, ""))
        else:
            raise FtlError(f"{arg}: neither a job id nor a pipeline folder with {JOBS_FILE}")
    return out


def report(args: list[str]) -> tuple[str, int]:
    """A table of the jobs' states, then each failure with its log's last lines; exit 1 if any failed."""
    rows = [("", "job", "state", "exit", "restarts", "reason", "log")]
    failures = []
    for label, job_id, log in targets(args):
        info = jobs.job_info(job_id)
        log = log or info.get("StdOut", "")
        state = info.get("JobState", "GONE (older than MinJobAge)")
        rows.append((label, job_id, state, info.get("ExitCode", "-"), info.get("Restarts", "-"),
                     info.get("Reason", "-"), log))
        if state in FAILED:
            tail = "".join(Path(log).read_text(errors="replace").splitlines(True)[-12:]) \
                if log and Path(log).exists() else "(no log)\n"
            failures.append(f"{label} (job {job_id}) failed: {state}, exit {info.get('ExitCode')}; "
                             f"log {log}\n{tail}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return table + ("\n\n" + "\n".join(failures) if failures else ""), 1 if failures else 0


def cancel(args: list[str]) -> list[str]:
    ids = [job_id for _, job_id, _ in targets(args) if job_id]
    jobs.cancel(ids)
    return ids
