"""Cores and memory in rendered job scripts: GPU defaults (cores per GPU, memory sized by `ftl plan`), the
recipe's and the command line's overrides, and an `srun` that really passes the cores on to the task."""

from __future__ import annotations

import os
import re
import subprocess

from conftest import ROOT
from ftl.config import load_recipe
from ftl.plan import GB, make_plan
from ftl.slurm.script import JobOptions, render

RECIPES = ROOT / "recipes"


def directives(recipe, options=JobOptions(), folder=ROOT) -> list[str]:
    text = render(recipe, options, folder / "logs", folder)
    return [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


def value(lines: list[str], key: str) -> str:
    found = [line.split("=", 1)[1] for line in lines if line.startswith(f"--{key}=")]
    assert len(found) == 1, (key, lines)
    return found[0]


def mem_gb(lines: list[str]) -> int:
    text = value(lines, "mem")
    assert re.fullmatch(r"\d+G", text), text
    return int(text[:-1])


def test_gpu_jobs_ask_for_cores_per_gpu_and_memory_that_follows_the_plan(tmp_path):
    node8 = load_recipe(RECIPES / "full_zero3.yaml", "node8")
    plain = directives(node8, folder=tmp_path)
    assert value(plain, "cpus-per-task") == "64"                        # 8 cores for each of 8 GPUs
    assert value(directives(load_recipe(RECIPES / "full_zero3.yaml", "multinode"), folder=tmp_path),
                 "cpus-per-task") == "64"                               # per node: its own 8 GPUs
    # offloading every state to the host: each of the 8 ranks needs the plan's host figure more
    offload = load_recipe(RECIPES / "full_zero3.yaml", "node8",
                          [f"launch.deepspeed={ROOT / 'launch' / 'ds_zero3_offload_all.json'}"])
    host = make_plan(offload).chosen.host
    assert host > 10 * GB
    extra = mem_gb(directives(offload, folder=tmp_path)) - mem_gb(plain)
    assert abs(extra - 8 * host / GB) <= 1, (extra, 8 * host / GB)
    # a single 8B QLoRA card asks for less than a whole 8-GPU node
    qlora = directives(load_recipe(RECIPES / "qlora_single.yaml", "gpu1"), folder=tmp_path)
    assert value(qlora, "cpus-per-task") == "8" and 8 < mem_gb(qlora) < mem_gb(plain)


def test_recipe_sets_cores_and_memory_and_the_command_line_wins(tmp_path):
    recipe = load_recipe(RECIPES / "full_zero3.yaml", "node8", ["launch.cpus_per_task=48", "launch.mem=400G"])
    lines = directives(recipe, folder=tmp_path)
    assert value(lines, "cpus-per-task") == "48" and value(lines, "mem") == "400G"
    lines = directives(recipe, JobOptions(cpus_per_task=32, mem="1T"), tmp_path)
    assert value(lines, "cpus-per-task") == "32" and value(lines, "mem") == "1T"
    # CPU profiles: one core per rank and the site's memory, unless the recipe says otherwise
    cpu = load_recipe(RECIPES / "sft_chat.yaml", "tiny_ddp")
    assert value(directives(cpu, folder=tmp_path), "cpus-per-task") == "2"
    assert not any(line.startswith("--mem") for line in directives(cpu, folder=tmp_path))
    cpu = load_recipe(RECIPES / "sft_chat.yaml", "tiny_ddp", ["launch.mem=6000"])   # MB, as Slurm reads it
    assert value(directives(cpu, folder=tmp_path), "mem") == "6000"


def fake_slurm_bin(folder) -> dict:
    """srun that records its arguments, scontrol that answers the multi-node script's two questions."""
    folder.mkdir()
    (folder / "srun").write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {folder}/srun.args\n')
    (folder / "scontrol").write_text('#!/bin/bash\nif [ "$2" = hostnames ]; then echo n1; else echo "NodeAddr=10.0.0.1"; fi\n')
    for tool in ("srun", "scontrol"):
        (folder / tool).chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}", "FTL_PYTHON": "/bin/true", "SLURM_JOB_ID": "7",
            "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NNODES": "2", "SLURM_NODEID": "0"}


def test_srun_passes_the_jobs_cores_to_the_task_in_both_templates(tmp_path):
    """Since Slurm 22.05 srun does not inherit --cpus-per-task: the scripts must pass it on."""
    env = fake_slurm_bin(tmp_path / "bin")
    for profile in ("node8", "multinode"):
        recipe = load_recipe(RECIPES / "full_zero3.yaml", profile)
        script = tmp_path / f"{profile}.sbatch"
        script.write_text(render(recipe, JobOptions(), tmp_path / "logs", tmp_path))
        for cpus in ("64", None):
            job_env = {**env, **({"SLURM_CPUS_PER_TASK": cpus} if cpus else {})}
            done = subprocess.run(["bash", str(script), "recipes/full_zero3.yaml", profile], env=job_env,
                                  capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            args = (tmp_path / "bin" / "srun.args").read_text().splitlines()
            task = args.index("bash")                                 # srun's own options come before it
            assert ("--cpus-per-task=64" in args[:task]) == (cpus is not None), (profile, cpus, args)
