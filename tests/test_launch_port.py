"""The rendezvous port `ftl launch` chooses when the recipe sets none: from the job id inside Slurm (jobs
sharing a node differ, nodes of one job agree), a free one on a local machine; a recipe's port is kept."""

from __future__ import annotations

import re
import socket

import pytest

from conftest import ROOT, tiny_recipe_dict, write_recipe
from ftl.cli import main

PORT = re.compile(r"--main_process_port (\d+)")


def dry_run_port(capsys, *argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        main(["launch", *argv, "--dry-run"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    command = out.split("ftl: launch command:\n")[1]
    return int(PORT.search(command).group(1))


def test_jobs_sharing_a_node_get_different_ports_and_nodes_of_one_job_the_same(capsys, monkeypatch):
    recipe = str(ROOT / "recipes" / "full_zero3.yaml")
    ports = {}
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "8")  # the GPUs the profiles ask for
    for job in ("4242", "4243"):
        monkeypatch.setenv("SLURM_JOB_ID", job)
        ports[job] = [dry_run_port(capsys, recipe, "--profile", "multinode", "--machine-rank", str(rank),
                                   "--main-ip", "10.0.0.1") for rank in (0, 3)]
        ports[job].append(dry_run_port(capsys, recipe, "--profile", "node8"))
    assert len(set(ports["4242"])) == 1 and len(set(ports["4243"])) == 1, ports   # every node, every profile
    assert ports["4242"][0] != ports["4243"][0], ports
    assert all(1024 < p[0] < 32768 for p in ports.values()), ports               # below the ephemeral range
    # a port the recipe sets is kept, in a job too
    assert dry_run_port(capsys, recipe, "--profile", "node8", "launch.main_process_port=29911") == 29911


def test_local_launch_without_a_port_picks_a_free_one(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    recipe = tiny_recipe_dict(tmp_path / "run", launch={"num_processes": 2})
    del recipe["launch"]["main_process_port"]
    path = write_recipe(tmp_path / "r.yaml", recipe)
    with socket.socket() as busy:          # another job on this machine holds the usual port (or it is taken)
        try:
            busy.bind(("", 29500))
            busy.listen()
        except OSError:
            pass
        port = dry_run_port(capsys, str(path))
    assert port != 29500
    with socket.socket() as probe:
        probe.bind(("", port))             # free when chosen (nothing else was started since)
