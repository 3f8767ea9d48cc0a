"""Slurm job scripts and multi-node launch commands, checked without a cluster: what `ftl slurm submit`
renders for the GPU profiles, and what each node's task runs."""

from __future__ import annotations

import subprocess

from conftest import ROOT, run_ftl
from ftl.config import load_recipe
from ftl.launch.command import NodeRole, build_launch_command
from ftl.slurm.jobs import sbatch_argv
from ftl.slurm.script import JobOptions, render


def rendered(recipe: str, profile: str, options=JobOptions(), tmp_path=ROOT) -> str:
    return render(load_recipe(ROOT / "recipes" / recipe, profile), options, tmp_path / "logs", tmp_path)


def directives(text: str) -> list[str]:
    return [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]


def test_node8_profile_renders_a_one_node_eight_gpu_job(tmp_path):
    text = rendered("full_zero3.yaml", "node8", JobOptions(partition="gpu", time="4:00:00", account="lab"),
                    tmp_path)
    lines = directives(text)
    assert {"--nodes=1", "--gpus-per-node=8", "--partition=gpu", "--time=4:00:00", "--account=lab",
            "--requeue", "--signal=USR1@300", "--open-mode=append", f"--chdir={tmp_path}"} <= set(lines)
    assert "srun --nodes=1 --ntasks=1" in text and "--machine-rank" not in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_multinode_profile_renders_one_task_per_node_with_rank_read_in_the_task(tmp_path):
    text = rendered("full_zero3.yaml", "multinode", tmp_path=tmp_path)
    assert {"--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8"} <= set(directives(text))
    task = next(line for line in text.splitlines() if "bash -c" in line)
    # single-quoted: $SLURM_NODEID is expanded by each node's task, not once by the batch shell
    assert task.strip().startswith("bash -c 'trap \"\" USR1; exec \"$@\" --machine-rank \"$SLURM_NODEID\"")
    assert 'launch.num_machines=$SLURM_NNODES' in text and "scontrol show hostnames" in text


def test_cpu_recipe_requests_one_core_per_rank_and_options_override_the_recipe(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "sft_chat.yaml", "tiny_ddp")
    assert "--cpus-per-task=2" in directives(render(recipe, JobOptions(), tmp_path, tmp_path))
    assert JobOptions(nodes=2, gpus_per_node=4).recipe_overrides("cuda") == \
        ["launch.num_machines=2", "launch.num_processes=4"]
    assert JobOptions(nodes=2, gpus_per_node=4).recipe_overrides("cpu") == ["launch.num_machines=2"]


def test_dependent_jobs_are_cancelled_if_their_dependency_fails():
    argv = sbatch_argv(ROOT / "job.sbatch", ["r.yaml", "tiny"], dependency="41", export={"FTL_PIPELINE_STAGE": "rm"})
    assert "--dependency=afterok:41" in argv and "--kill-on-invalid-dep=yes" in argv
    assert "--export=ALL,FTL_PIPELINE_STAGE=rm" in argv and argv[-2:] == ["r.yaml", "tiny"]


def test_each_node_launches_with_c10d_rendezvous_on_the_first_node(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)   # outside a job: the multi-node default port
    recipe = load_recipe(ROOT / "recipes" / "full_zero3.yaml", "multinode")
    head = build_launch_command(recipe, "r.yaml", node=NodeRole(0, "10.0.0.1")).shell()
    other = build_launch_command(recipe, "r.yaml", node=NodeRole(3, "10.0.0.1")).shell()
    assert "--num_processes 32 --num_machines 4" in head and "--main_process_ip 10.0.0.1" in head
    assert "--rdzv_backend c10d" in head and "--rdzv_conf is_host=true" in head
    assert "--machine_rank 3" in other and "--rdzv_conf is_host=false" in other
    assert "--deepspeed_multinode_launcher standard" in head   # per-node torchrun, not pdsh/ssh
    torchrun = recipe.model_copy(update={"launch": recipe.launch.model_copy(update={"launcher": "torchrun"})})
    cmd = build_launch_command(torchrun, "r.yaml", node=NodeRole(1, "10.0.0.1")).shell()
    assert "--node_rank=1" in cmd and "--rdzv_endpoint=10.0.0.1:29500" in cmd


def test_machine_rank_without_an_address_is_refused(tmp_path):
    proc = run_ftl("launch", str(ROOT / "recipes" / "full_zero3.yaml"), "--profile", "multinode",
                   "--machine-rank", "1", "--dry-run", cwd=tmp_path)
    assert proc.returncode == 2 and "--machine-rank and --main-ip go together" in proc.stderr
