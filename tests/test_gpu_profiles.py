"""Every GPU profile of every shipped recipe prints its launch command and its Slurm job script (issue #14,
"Done when"): `ftl launch --dry-run` and `ftl slurm submit --dry-run` succeed, start one rank per GPU, and
render a script bash accepts. No GPU here: what would run is printed and inspected, never faked as run."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from conftest import ROOT
from ftl.cli import main

RECIPE_FILES = sorted(p for p in [*ROOT.glob("recipes/*.yaml"), *ROOT.glob("recipes/rlhf/*.yaml")]
                      if "profiles" in (yaml.safe_load(p.read_text()) or {}))


def gpu_profiles() -> list[tuple[str, str]]:
    found = []
    for path in RECIPE_FILES:
        for name, profile in yaml.safe_load(path.read_text())["profiles"].items():
            if ((profile or {}).get("launch") or {}).get("device") == "cuda":
                found.append((str(path.relative_to(ROOT)), name))
    return found


GPU_PROFILES = gpu_profiles()


def cli(capsys, monkeypatch, *argv: str) -> tuple[int, str]:
    for name in ("SLURM_JOB_ID", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:
        main(list(argv))
    out, err = capsys.readouterr()
    return done.value.code, out + err


def test_every_recipe_ships_gpu_profiles():
    assert {("recipes/full_zero3.yaml", "node8"), ("recipes/full_zero3.yaml", "multinode"),
            ("recipes/qlora_single.yaml", "gpu1"), ("recipes/sft_chat.yaml", "gpu1")} <= set(GPU_PROFILES)


@pytest.mark.parametrize("recipe,profile", GPU_PROFILES)
def test_gpu_profile_prints_its_launch_command_and_job_script(capsys, monkeypatch, recipe, profile):
    from ftl.config import load_recipe

    launch = load_recipe(ROOT / recipe, profile).launch
    node = ["--machine-rank", "0", "--main-ip", "10.0.0.1"] if launch.num_machines > 1 else []
    code, out = cli(capsys, monkeypatch, "launch", recipe, "--profile", profile, *node, "--dry-run")
    assert code == 0, out
    command = out.split("ftl: launch command:\n")[1].splitlines()[0]
    ranks = re.search(r"--num_processes[ =](\d+)|--nproc_per_node=(\d+)|--num_gpus=(\d+)", command)
    assert ranks and int(next(g for g in ranks.groups() if g)) in (launch.num_processes * launch.num_machines,
                                                                  launch.num_processes), command
    assert f"--profile {profile}" in command and "per-device memory" in out

    code, out = cli(capsys, monkeypatch, "slurm", "submit", recipe, "--profile", profile, "--dry-run")
    assert code == 0, out
    script = out.split("ftl slurm: ")[0]
    assert f"#SBATCH --gpus-per-node={launch.num_processes}" in script
    assert f"#SBATCH --nodes={launch.num_machines}" in script and "#SBATCH --mem=" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
