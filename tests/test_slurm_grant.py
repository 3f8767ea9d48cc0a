"""Inside a Slurm job, a CUDA recipe starts one rank per GPU Slurm granted on the node (issue #14, finding 2):
`sbatch --gpus-per-node=4 slurm/train_node.sbatch recipes/full_zero3.yaml node8` runs 4 ranks, not 8 on 4
GPUs. Driven through `ftl launch --dry-run` (what the sbatch templates run on each node) with the
environment Slurm gives a job."""

from __future__ import annotations

import re

import pytest

from conftest import ROOT
from ftl.cli import main
from ftl.config import load_recipe
from ftl.errors import LaunchError
from ftl.launch.slurm_grant import fit_to_grant, granted_gpus

RECIPE = str(ROOT / "recipes" / "full_zero3.yaml")
RANKS = re.compile(r"--num_processes (\d+)")


def dry_run(capsys, monkeypatch, env: dict, *argv: str) -> tuple[int, str]:
    for name in ("SLURM_JOB_ID", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as done:
        main(["launch", RECIPE, *argv, "--dry-run"])
    out, err = capsys.readouterr()
    return done.value.code, out + err


def test_a_job_granted_4_gpus_runs_the_node8_profile_on_4_ranks_and_every_rank_is_told(capsys, monkeypatch):
    code, out = dry_run(capsys, monkeypatch, {"SLURM_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "4"}, "--profile", "node8")
    assert code == 0, out
    command = out.split("ftl: launch command:\n")[1].splitlines()[0]
    assert RANKS.search(command).group(1) == "4", command
    assert command.endswith("launch.num_processes=4"), command   # the ranks' recipe says 4 too
    assert "Slurm granted 4 GPU(s) on this node: launch.num_processes 8 -> 4" in out
    # outside Slurm the profile's 8 ranks stand
    code, out = dry_run(capsys, monkeypatch, {}, "--profile", "node8")
    assert code == 0 and RANKS.search(out.split("ftl: launch command:\n")[1]).group(1) == "8", out


def test_multinode_profile_takes_the_per_node_grant(capsys, monkeypatch):
    code, out = dry_run(capsys, monkeypatch, {"SLURM_JOB_ID": "78", "SLURM_GPUS_ON_NODE": "4"}, "--profile",
                        "multinode", "launch.num_machines=4", "--machine-rank", "1", "--main-ip", "10.0.0.1")
    assert code == 0, out
    assert RANKS.search(out.split("ftl: launch command:\n")[1]).group(1) == "16", out   # 4 nodes x 4 GPUs


def test_a_cuda_job_granted_no_gpu_is_refused_before_any_rank_starts(capsys, monkeypatch):
    code, out = dry_run(capsys, monkeypatch, {"SLURM_JOB_ID": "79"}, "--profile", "node8")
    assert code == 2, out
    errors = [line for line in out.splitlines() if line.startswith("ftl: error:")]
    assert len(errors) == 1 and "granted no GPU" in errors[0] and "--gpus-per-node=8" in errors[0], out
    assert "Traceback" not in out and "launch command" not in out


def test_a_count_set_on_the_command_line_is_kept_when_granted_and_refused_when_not():
    recipe = load_recipe(RECIPE, "node8", [])
    job = {"SLURM_JOB_ID": "80", "SLURM_GPUS_ON_NODE": "4"}
    two = ["launch.num_processes=2"]
    assert fit_to_grant(load_recipe(RECIPE, "node8", two), two, job).overrides == two
    with pytest.raises(LaunchError, match=r"launch.num_processes=8 ranks per node but Slurm granted 4"):
        fit_to_grant(load_recipe(RECIPE, "node8", ["launch.num_processes=8"]), ["launch.num_processes=8"], job)
    same = fit_to_grant(recipe, [], {**job, "SLURM_GPUS_ON_NODE": "8"})
    assert same.overrides == [] and same.message is None


def test_cpu_recipes_and_launches_outside_slurm_are_left_alone():
    cpu = load_recipe(str(ROOT / "recipes" / "sft_chat.yaml"), None, [])
    assert cpu.launch.device == "cpu"
    assert fit_to_grant(cpu, [], {"SLURM_JOB_ID": "81", "SLURM_GPUS_ON_NODE": "1"}).overrides == []
    assert fit_to_grant(load_recipe(RECIPE, "node8", []), [], {"SLURM_GPUS_ON_NODE": "4"}).overrides == []


def test_the_grant_is_read_from_slurm_or_the_visible_devices_it_set():
    assert granted_gpus({"SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1"}) == 4
    assert granted_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == 2
    assert granted_gpus({}) is None
    with pytest.raises(LaunchError, match="SLURM_GPUS_ON_NODE: expected a number of GPUs, got 'a100:4'"):
        granted_gpus({"SLURM_GPUS_ON_NODE": "a100:4"})
