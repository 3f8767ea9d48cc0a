"""Uneven shards do not hang (issue #14, finding 7): every rank runs as many evaluation batches and
generate calls as the busiest one (padding dropped from the results), so ZeRO-3's collective forwards and
synced generation always find every rank. Real runs on 2 gloo ranks under ZeRO-3."""

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch

from conftest import (RECIPES, ROOT, free_port, ftl_command, kill_process_tree, read_jsonl, subprocess_env,
                      tiny_recipe_dict, write_recipe)
from ftl.evaluate.sharded import sum_over_ranks

ZERO3 = {"deepspeed": str(ROOT / "launch" / "ds_zero3.json"), "config_file": str(ROOT / "launch" / "zero3.yaml")}
HUNG_AFTER = 240  # seconds; both runs below finish in under 20 s


@pytest.mark.parametrize("n, world, size, expected", [
    (0, 2, 4, 0), (1, 2, 4, 1), (1, 1, 4, 1), (2, 2, 1, 1), (3, 2, 1, 2),
    (8, 2, 4, 1), (9, 2, 4, 2), (16, 2, 4, 2), (17, 2, 4, 3), (44, 2, 16, 2), (5, 8, 2, 1),
])
def test_batches_per_rank_is_the_largest_shares_batch_count(n, world, size, expected):
    from ftl.evaluate.sharded import batches_per_rank  # here: the runs below also fail alone on code without it

    assert batches_per_rank(n, world, size) == expected
    shares = [len(range(rank, n, world)) for rank in range(world)]
    assert expected == max(-(-s // size) for s in shares)


def test_an_exhausted_rank_runs_padding_batches_and_drops_them():
    """Rank 1 of 2 holds 1 of 3 examples: it runs 2 batches like rank 0, and counts only its own."""
    accelerator = SimpleNamespace(process_index=1, num_processes=2, device=torch.device("cpu"),
                                  reduce=lambda totals, reduction: totals)  # this rank's own sums
    forwards = []

    def measure(batch):
        forwards.append(batch["x"].tolist())
        return torch.tensor([1.0, float(batch["x"].sum())])

    features = [{"x": 1.0}, {"x": 10.0}, {"x": 100.0}]
    totals = sum_over_ranks(torch.nn.Linear(1, 1), features, 1, lambda rows: {"x": torch.tensor([r["x"] for r in rows])},
                            measure, 2, accelerator)
    assert forwards == [[10.0], [1.0]]  # its share, then a padding batch of features[:1]
    assert totals.tolist() == [1.0, 10.0]


def launch_or_fail(recipe_args: list[str], cwd, log) -> None:
    """`ftl launch`; ranks still running after HUNG_AFTER seconds are killed (with their launchers) and fail."""
    with open(log, "w") as out:
        proc = subprocess.Popen(ftl_command("launch", *recipe_args), cwd=cwd, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=HUNG_AFTER)
        except subprocess.TimeoutExpired:
            kill_process_tree(proc.pid)
            pytest.fail(f"ranks hung: no end after {HUNG_AFTER} s\n{log.read_text()[-3000:]}")
    assert code == 0, log.read_text()[-5000:]


@pytest.mark.slow
def test_zero3_sft_with_fewer_validation_examples_than_ranks_finishes(tmp_path):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", tiny_recipe_dict(
        run, train={"max_steps": 2, "save_every": 2, "batch_size": 2},
        eval={"max_examples": 1, "before_training": True, "generate": {"from_validation": 0}},
        launch={"num_processes": 2, **ZERO3}))
    launch_or_fail([str(recipe)], tmp_path, tmp_path / "launch.log")
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and "zero" in manifest["rank_checks"][0]
    report = json.loads((run / "eval.json").read_text())
    assert report["before"]["tokens"] == report["after"]["tokens"] > 0  # one example, counted once
    from ftl.config import load_recipe
    from ftl.data import load_splits
    from ftl.data.tokenize import encode_records
    from transformers import AutoTokenizer

    loaded = load_recipe(run / "recipe.yaml")
    (one,) = encode_records(AutoTokenizer.from_pretrained(run / "final"),
                            load_splits(loaded.data)[0].validation[:1], loaded.data)
    assert report["after"]["tokens"] == sum(label != -100 for label in one["labels"][1:])  # not doubled by padding


@pytest.mark.slow
def test_zero3_upft_with_uneven_generation_batches_finishes(tmp_path):
    """44 jobs (38 training prompts + 6 validation ones) in batches of 16: rank 0 draws batches 0 and 2,
    rank 1 batch 1 and then a dummy batch whose outputs are dropped."""
    run = tmp_path / "run"
    overrides = [f"track.output_dir={run}", f"launch.main_process_port={free_port()}", "data.limit=44",
                 "eval.batch_size=16", "train.max_steps=2", "train.save_every=2",
                 f"launch.config_file={ZERO3['config_file']}", f"launch.deepspeed={ZERO3['deepspeed']}"]
    launch_or_fail([str(RECIPES / "upft.yaml"), "--profile", "tiny_ddp", *overrides], tmp_path,
                   tmp_path / "launch.log")
    assert json.loads((run / "manifest.json").read_text())["world_size"] == 2
    samples = read_jsonl(run / "upft_samples.jsonl")
    keys = [(s["split"], s["prompt_index"], s["sample"]) for s in samples]
    assert len(samples) == len(set(keys)) == 44  # every job once, no dummy answers
    assert sum(s["split"] == "validation" for s in samples) == 6
