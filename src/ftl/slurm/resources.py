"""The cores and memory a job asks for on each node. The command line (--cpus-per-task, --mem) wins over
the recipe (launch.cpus_per_task, launch.mem), which wins over the defaults: CPU profiles get one core per
rank and the site's default memory; GPU profiles get CPUS_PER_GPU cores per GPU and memory sized by
`ftl plan`."""

from __future__ import annotations

import math
from typing import Optional

from ftl.config.schema import Recipe
from ftl.errors import FtlError, LaunchError

GB = 1024**3
CPUS_PER_GPU = 8            # data loading, tokenisation and the launcher for each GPU's rank
RANK_OVERHEAD_GB = 8        # per rank: CUDA context, pinned transfer buffers, data loader workers
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def cpus_per_task(recipe: Recipe, cli: Optional[int]) -> int:
    launch = recipe.launch
    default = launch.num_processes * (CPUS_PER_GPU if launch.device == "cuda" else 1)
    return cli or launch.cpus_per_task or default


def memory(recipe: Recipe, cli: Optional[str]) -> Optional[str]:
    """Slurm's --mem for each node; None leaves it to the site (CPU profiles)."""
    if cli or recipe.launch.mem:
        return cli or recipe.launch.mem
    if recipe.launch.device != "cuda":
        return None
    try:
        return f"{math.ceil(planned_host_bytes(recipe) / GB)}G"
    except FtlError as err:
        raise LaunchError(f"--mem: cannot size the job's memory from the plan ({err}); pass --mem or set "
                          "launch.mem") from None


def planned_host_bytes(recipe: Recipe) -> float:
    """Host memory of one node: per rank, what `ftl plan` offloads to the host, the weights as a rank
    loads them (whole, then moved to its GPU; under ZeRO-3 partitioned while loading), and a fixed
    overhead."""
    from ftl.plan import make_plan  # imports torch: only GPU jobs without a --mem are sized

    plan = make_plan(recipe)
    weights = plan.shape.total * DTYPE_BYTES[recipe.model.dtype]
    if plan.setup.zero_stage == 3:
        weights /= plan.setup.devices
    per_rank = plan.chosen.host + weights + RANK_OVERHEAD_GB * GB
    return recipe.launch.num_processes * per_rank
