"""Ranks per node inside a Slurm job come from the GPUs Slurm granted, not from the profile.

`sbatch --gpus-per-node=4 slurm/train_node.sbatch RECIPE node8` grants 4 GPUs while the node8 profile
says 8 ranks: started as written, 8 ranks would share 4 devices. `ftl launch` on a CUDA recipe inside a
job therefore starts one rank per granted GPU (SLURM_GPUS_ON_NODE, or the count of CUDA_VISIBLE_DEVICES
that Slurm's gres plugin sets) and says so; the new count reaches every rank as the override
`launch.num_processes=N`, so the run's saved recipe and manifest record it. A count the user set on the
command line is kept when the grant covers it and refused when it does not; a CUDA job granted no GPU is
refused before any rank starts. CPU recipes and launches outside Slurm are left as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from ftl.config.schema import Recipe
from ftl.errors import LaunchError

OVERRIDE = "launch.num_processes="


@dataclass
class Grant:
    overrides: list[str]         # the command line's overrides, plus launch.num_processes=N when adopted
    message: Optional[str] = None  # what changed and why, printed by `ftl launch`


def granted_gpus(environ: Mapping[str, str]) -> Optional[int]:
    """GPUs Slurm granted on this node, or None when it says nothing."""
    gpus = environ.get("SLURM_GPUS_ON_NODE", "").strip()
    if gpus:
        if not gpus.isdigit():
            raise LaunchError(f"SLURM_GPUS_ON_NODE: expected a number of GPUs, got {gpus!r}")
        return int(gpus)
    visible = environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    return None


def fit_to_grant(recipe: Recipe, overrides: list[str], environ: Optional[Mapping[str, str]] = None) -> Grant:
    """The overrides that start one rank per granted GPU (see the module docstring)."""
    environ = os.environ if environ is None else environ
    launch = recipe.launch
    if not environ.get("SLURM_JOB_ID") or launch.device != "cuda":
        return Grant(list(overrides))
    granted = granted_gpus(environ)
    wanted = launch.num_processes
    if not granted:
        raise LaunchError(f"launch.device is 'cuda' but Slurm job {environ['SLURM_JOB_ID']} was granted no GPU on "
                          f"this node (SLURM_GPUS_ON_NODE and CUDA_VISIBLE_DEVICES are unset): submit with "
                          f"--gpus-per-node={wanted}")
    if granted == wanted:
        return Grant(list(overrides))
    if any(o.startswith(OVERRIDE) for o in overrides):  # the user's own count: kept if the grant covers it
        if wanted > granted:
            raise LaunchError(f"launch.num_processes={wanted} ranks per node but Slurm granted {granted} GPU(s) on "
                              f"this node: ask sbatch for --gpus-per-node={wanted} or set launch.num_processes="
                              f"{granted}")
        return Grant(list(overrides))
    per_step = recipe.train.batch_size * recipe.train.grad_accum * launch.num_machines
    return Grant(list(overrides) + [f"{OVERRIDE}{granted}"],
                 f"ftl: Slurm granted {granted} GPU(s) on this node: launch.num_processes {wanted} -> {granted} "
                 f"(sequences per optimizer step {per_step * wanted} -> {per_step * granted})")
