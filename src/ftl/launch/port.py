"""The rendezvous port of a launch (`launch.main_process_port`), when the recipe does not set one.

Inside a Slurm job it comes from the job id: every node's task computes the same port, and jobs sharing a
node get different ones. Elsewhere one node picks a free port. Nodes started by hand (multi-node, no Slurm)
cannot share a pick, so they use the usual default and the recipe should set the port.
"""

from __future__ import annotations

import os
import socket
from typing import Mapping, Optional

from ftl.errors import LaunchError

# 20000-28999: below Linux's ephemeral ports (32768+, taken by outgoing connections) and torch's 29500
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 9000
MULTI_NODE_DEFAULT = 29500


def slurm_job_port(job_id: int) -> int:
    return SLURM_PORT_BASE + job_id % SLURM_PORT_SPAN


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick); the launcher binds it moments later."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main_process_port(recipe_port: Optional[int], multi_node: bool,
                      environ: Optional[Mapping[str, str]] = None) -> int:
    """The recipe's port if it sets one; else derived from SLURM_JOB_ID; else a free one (single node)."""
    if recipe_port is not None:
        return recipe_port
    job_id = (os.environ if environ is None else environ).get("SLURM_JOB_ID", "")
    if job_id:
        if not job_id.isdigit():
            raise LaunchError(f"SLURM_JOB_ID: expected a job number, got {job_id!r}")
        return slurm_job_port(int(job_id))
    return MULTI_NODE_DEFAULT if multi_node else free_port()
