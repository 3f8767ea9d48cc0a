"""Render a job script: a template from slurm/ with its #SBATCH lines set from the recipe and options."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftl.config.schema import SLURM_MEMORY, Recipe
from ftl.errors import LaunchError
from ftl.slurm.resources import cpus_per_task, memory

TEMPLATES = Path(__file__).resolve().parents[3] / "slurm"
ONE_NODE, MANY_NODES = "train_node.sbatch", "train_multinode.sbatch"
PYTHON_LINE = re.compile(r"^PYTHON=\$\{FTL_PYTHON:-[^}]*\}$", re.M)


@dataclass
class JobOptions:
    """What `ftl slurm submit` takes besides the recipe (None: from the recipe, or Slurm's default)."""
    nodes: Optional[int] = None
    gpus_per_node: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None          # Slurm's --mem per node, e.g. 256G
    partition: Optional[str] = None
    time: Optional[str] = None
    account: Optional[str] = None
    signal_seconds: int = 300          # warning before the time limit: room to write one checkpoint
    job_name: Optional[str] = None

    def __post_init__(self):
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise LaunchError(f"--cpus-per-task: expected a whole number above 0, got {self.cpus_per_task}")
        if self.mem is not None and not SLURM_MEMORY.fullmatch(self.mem):
            raise LaunchError(f"--mem: expected a Slurm memory size such as 256G or 65536M, got {self.mem!r}")

    def recipe_overrides(self, device: str) -> list[str]:
        """The recipe keys these options decide, so the job's run matches what was requested."""
        out = [f"launch.num_machines={self.nodes}"] if self.nodes else []
        if self.gpus_per_node and device == "cuda":
            out.append(f"launch.num_processes={self.gpus_per_node}")
        return out


def template_for(recipe: Recipe) -> Path:
    return TEMPLATES / (MANY_NODES if recipe.launch.num_machines > 1 else ONE_NODE)


def directives(recipe: Recipe, options: JobOptions, log_dir: Path, workdir: Path) -> list[str]:
    launch = recipe.launch
    name = options.job_name or f"ftl-{recipe.name}-{recipe.profile or 'base'}"
    gpus = options.gpus_per_node if options.gpus_per_node is not None else \
        (launch.num_processes if launch.device == "cuda" else 0)
    lines = [f"--job-name={name}", f"--nodes={launch.num_machines}", "--ntasks-per-node=1"]
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    lines.append(f"--cpus-per-task={cpus_per_task(recipe, options.cpus_per_task)}")
    mem = memory(recipe, options.mem)
    if mem:
        lines.append(f"--mem={mem}")
    for key in ("partition", "time", "account"):
        if getattr(options, key):
            lines.append(f"--{key}={getattr(options, key)}")
    lines += ["--requeue", f"--signal=USR1@{options.signal_seconds}", "--open-mode=append",
              f"--output={log_dir / '%x-%j.out'}", f"--chdir={workdir}"]
    return [f"#SBATCH {line}" for line in lines]


def render(recipe: Recipe, options: JobOptions, log_dir: Path, workdir: Path,
           python: str = sys.executable) -> str:
    """The template with its #SBATCH block replaced and this interpreter as the default Python."""
    template = template_for(recipe)
    if not template.exists():
        raise LaunchError(f"sbatch template {template} not found (ftl slurm runs from a source checkout)")
    lines = template.read_text().splitlines()
    block = [i for i, line in enumerate(lines) if line.startswith("#SBATCH ")]
    if not block:
        raise LaunchError(f"{template}: no #SBATCH lines to fill in")
    body = lines[:block[0]] + directives(recipe, options, log_dir, workdir) + \
        [line for line in lines[block[0]:] if not line.startswith("#SBATCH ")]
    text = "\n".join(body) + "\n"
    return PYTHON_LINE.sub(f"PYTHON=${{FTL_PYTHON:-{python}}}", text, count=1)
