"""End to end on the tiny profile: a real SFT run, its run directory, W&B offline, eval, reproduction."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, run_ftl, tiny_recipe_dict, train_losses, write_recipe

SECRET = "wandb-secret-key-0123456789abcdef"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft")
    recipe = tiny_recipe_dict(tmp / "run", eval={"before_training": True, "max_examples": 16,
                                                 "generate": {"from_validation": 2, "max_new_tokens": 4}},
                              track={"output_dir": str(tmp / "run"), "wandb": {"enabled": True}})
    path = write_recipe(tmp / "recipe.yaml", recipe)
    proc = run_ftl("run", str(path), cwd=tmp, WANDB_API_KEY=SECRET, WANDB_MODE="offline")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


def test_loss_decreases_by_a_clear_margin(finished_run):
    losses = train_losses(finished_run[0])
    assert len(losses) == 16
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses
    report = json.loads((finished_run[0] / "eval.json").read_text())
    assert report["after"]["loss"] < report["before"]["loss"] - 0.5


def test_run_directory_is_self_describing(finished_run):
    run = finished_run[0]
    for name in ("recipe.yaml", "manifest.json", "metrics.jsonl", "eval.json", "eval.md", "curves.png",
                 "final/config.json", "final/model.safetensors", "final/tokenizer_config.json"):
        assert (run / name).exists(), name
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000012", "step-0000016"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["finished"] is True
    assert manifest["packages"]["torch"].startswith("2.13.0")
    assert len(manifest["data"]["fingerprints"]["train"]) == 16
    assert manifest["data"]["sizes"]["train"] > manifest["data"]["sizes"]["validation"] > 0
    assert manifest["command"][1:3] == ["run", manifest["command"][2]]
    assert "commit" in manifest["git"]
    assert manifest["trainable"]["trainable_share"] == 1.0
    memory = manifest["memory"]  # measured in the run's own process: peak > the runtime before the model > 0
    assert memory["peak_bytes"] > memory["baseline_bytes"] > 0 and memory["measure"].startswith("host RSS")
    assert [r["peak_bytes"] for r in memory["per_rank"]] == [memory["peak_bytes"]]
    assert set(memory["per_rank"][0]["marks"]) == {"start", "data", "model", "trained", "end"}
    assert memory["planned"]["peak_bytes"] > memory["baseline_bytes"] and abs(memory["planned_error"]) < 0.5
    choice = manifest["gradient_checkpointing"]  # auto, off: the CPU runtime dwarfs a tiny model's activations
    assert choice["auto"] is True and choice["on"] is False and choice["reason"].startswith("auto: activations")
    assert yaml.safe_load((run / "recipe.yaml").read_text())["model"]["gradient_checkpointing"] is False
    assert "ftl: gradient checkpointing off: auto:" in finished_run[1].stdout
    assert "ftl: peak memory" in finished_run[1].stdout
    eval_md = (run / "eval.md").read_text()
    assert "| loss |" in eval_md and "before" in eval_md and "after" in eval_md


def test_wandb_offline_run_written_and_no_secret_anywhere(finished_run):
    run, proc = finished_run
    wandb_files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(wandb_files) == 1 and wandb_files[0].stat().st_size > 0
    assert "W&B offline run" in proc.stdout
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"secret written to {path}"
    assert SECRET not in proc.stdout + proc.stderr


def test_ftl_eval_reloads_the_final_model_with_identical_loss(finished_run, tmp_path):
    run = finished_run[0]
    proc = run_ftl("eval", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reloaded = json.loads((run / "eval" / "eval.json").read_text())["eval"]
    trained = json.loads((run / "eval.json").read_text())["after"]
    assert reloaded["tokens"] == trained["tokens"]
    assert reloaded["loss"] == pytest.approx(trained["loss"], abs=1e-5)
    assert [s["generation"] for s in reloaded["samples"][:2]] == [s["generation"] for s in trained["samples"]]


def test_ftl_eval_on_a_model_folder_with_a_data_file(finished_run, tmp_path):
    # the run's own evaluation examples as a plain data file: evaluating the bare model folder on it must give
    # the loss the run reported for its final model (eval.json), on the same tokens
    from ftl.config import load_recipe
    from ftl.data import load_splits

    run = finished_run[0]
    recipe = load_recipe(run / "recipe.yaml")
    records = load_splits(recipe.data)[0].validation[: recipe.eval.max_examples]
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = run_ftl("eval", str(run / "final"), "--data", str(data), "--format", "chat", "--out",
                   str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "eval.json").read_text())["eval"]
    trained = json.loads((run / "eval.json").read_text())
    assert result["examples"] == len(records) == 16
    assert result["tokens"] == trained["after"]["tokens"]
    assert result["loss"] == pytest.approx(trained["after"]["loss"], abs=1e-4)
    assert result["loss"] < trained["before"]["loss"] - 0.5  # the trained model, not the untrained base


def test_resolved_recipe_reproduces_the_run(finished_run, tmp_path):
    run = finished_run[0]
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    resolved["track"]["output_dir"] = str(tmp_path / "again")
    resolved["track"]["wandb"]["enabled"] = False
    resolved["eval"]["before_training"] = False
    path = write_recipe(tmp_path / "resolved.yaml", resolved)
    proc = run_ftl("run", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_losses(tmp_path / "again") == train_losses(run)


def test_reloaded_lora_run_matches_its_evaluation(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", method={"kind": "lora", "lora": {"r": 4, "alpha": 8}},
                              train={"max_steps": 6, "lr": 1e-2, "save_every": 3})
    proc = run_ftl("run", str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = tmp_path / "run" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
    from ftl.data import load_splits
    from ftl.evaluate.lm import lm_loss
    from ftl.models.trained import load_trained_causal_lm
    from ftl.data.tokenize import encode_records

    model, tokenizer, loaded = load_trained_causal_lm(tmp_path / "run")
    validation = load_splits(loaded.data)[0].validation[: loaded.eval.max_examples]
    metrics = lm_loss(model, encode_records(tokenizer, validation, loaded.data), tokenizer.pad_token_id)
    after = json.loads((tmp_path / "run" / "eval.json").read_text())["after"]
    assert metrics["loss"] == pytest.approx(after["loss"], abs=1e-5)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert 0 < manifest["trainable"]["trainable_share"] < 0.5


def test_bad_recipe_exits_with_a_one_line_error(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run")
    recipe["data"]["formatt"] = "chat"
    proc = run_ftl("run", str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'data.formatt'; did you mean 'data.format'" in proc.stderr
    assert "Traceback" not in proc.stderr
