"""Everyday CLI habits: `ftl --version`, `ftl recipes`, `ftl run --print-config`, and W&B runs named the way
Trainer and TRL users read their dashboards (train/loss, train/lr, eval/...; a pipeline's stages in one group,
the stage as job type), checked in W&B's own offline run file."""

import time
from pathlib import Path

import yaml

from conftest import RECIPES, copy_rlhf_pipeline, run_ftl, tiny_recipe_dict, write_recipe


def finished_wandb_records(folder: Path, timeout: float = 30.0) -> list:
    """The records of the one offline run under folder/wandb, once its writer has flushed them: wandb.finish()
    can return before the service process has written the file (seen once in CI, on a loaded machine: a file with
    no records yet), so wait for its closing `exit` record."""
    deadline, records = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        files = list(folder.glob("wandb/offline-run-*/run-*.wandb"))
        assert len(files) <= 1, files
        try:
            records = list(wandb_records(files[0])) if files else []
        except Exception:  # noqa: BLE001 - a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.2)
    return records


def wandb_records(path: Path):
    """The protobuf records of a W&B .wandb file (LevelDB log format: a 7-byte file header, then 32 KiB blocks
    of records, each with a 7-byte header: crc32, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pieces = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pieces = payload if kind in (1, 2) else pieces + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record


def test_version_names_ftl_and_the_libraries_it_drives(tmp_path):
    proc = run_ftl("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("ftl 0.") and "torch 2.13.0" in line and "deepspeed " in line and "\n" not in line


def test_recipes_lists_every_shipped_recipe_with_description_and_profiles(tmp_path):
    proc = run_ftl("recipes", str(RECIPES), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0].rsplit("recipes/", 1)[1]: line for line in proc.stdout.splitlines()}
    shipped = {str(p.relative_to(RECIPES)) for p in RECIPES.rglob("*.yaml")}
    assert set(lines) == shipped
    assert "full-parameter SFT under ZeRO-3" in lines["full_zero3.yaml"]
    assert "[profiles: tiny, tiny_offload, small, node8, multinode]" in lines["full_zero3.yaml"]
    assert " ppo " in lines["rlhf/ppo.yaml"] and "RLHF step 3" in lines["rlhf/ppo.yaml"]
    assert " pipeline " in lines["rlhf/pipeline.yaml"]
    assert "cannot read" not in proc.stdout


def test_print_config_prints_the_resolved_recipe_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_TEST_TOKEN", "hf_secret_value_123")
    recipe = tiny_recipe_dict(tmp_path)
    recipe["launch"] = {"env": {"HF_TOKEN": "${FTL_TEST_TOKEN}"}}
    recipe["profiles"] = {"fast": {"train": {"max_steps": 3}}}
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_ftl("run", str(path), "--profile", "fast", "--print-config", "train.lr=0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["train"]["max_steps"] == 3 and printed["train"]["lr"] == 0.5 and printed["profile"] == "fast"
    assert "profiles" not in printed and printed["launch"]["env"]["HF_TOKEN"] == "${FTL_TEST_TOKEN}"
    assert "hf_secret_value_123" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()  # nothing run, no run folder


def test_wandb_names_metrics_as_trainer_does_and_sets_group_and_job_type(tmp_path, monkeypatch):
    from ftl.config.schema import WandbConfig
    from ftl.track.wandb_run import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    sink = WandbSink(WandbConfig(enabled=True, group="rlhf-tiny"), tmp_path, "rlhf_reward-tiny", {"a": 1}, "reward")
    sink({"step": 1, "loss": 2.0, "lr": 0.1, "tokens": 64})
    sink({"step": 2, "eval/loss": 1.5})
    sink.finish()
    records = finished_wandb_records(tmp_path)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_group, run.job_type) == ("rlhf-tiny", "reward")
    logged = [{name for name in (i.key or "/".join(i.nested_key) for i in r.history.item) if name[0] != "_"}
              for r in records if r.WhichOneof("record_type") == "history"]
    assert logged == [{"train/loss", "train/lr", "train/tokens"}, {"eval/loss"}]


def test_pipeline_stages_share_a_wandb_group_unless_a_recipe_names_one(tmp_path):
    from ftl.pipeline import plan_stages

    pipeline = copy_rlhf_pipeline(tmp_path, ["sft", "reward", "ppo"], sft=["track.wandb.enabled=true"],
                                  reward=["track.wandb.enabled=true", "track.wandb.group=mine"])
    _, plans = plan_stages(pipeline, "tiny")
    groups = {p.name: p.recipe.track.wandb.group for p in plans}
    assert groups == {"sft": "out", "reward": "mine", "ppo": None}  # the pipeline's folder; ppo: W&B off
