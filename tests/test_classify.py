"""Classification heads: a new head on a pretrained encoder (MiniLM) or decoder (tiny Llama, SmolLM2),
head-only vs full, from scratch, Chinese sentiment with disjoint splits, and `ftl compare`."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, read_jsonl, run_ftl
from ftl.config import load_recipe
from ftl.data import load_splits
from ftl.errors import DataError
from ftl.data.splits import Splits
from ftl.evaluate.classification import label_id
from ftl.stages.classify import label_names

SENTIMENT = ROOT / "recipes" / "classify_sentiment_zh.yaml"
TOPIC = ROOT / "recipes" / "classify_topic.yaml"
COMPARED = ROOT / "recipes" / "classify_topic_smollm2.yaml"   # what `make compare` runs


def eval_after(run_dir):
    return json.loads((run_dir / "eval.json").read_text())


def test_sentiment_splits_are_deduplicated_disjoint_and_hold_both_labels():
    recipe = load_recipe(SENTIMENT, "small")
    splits, _ = load_splits(recipe.data)
    texts = {name: [r["text"] for r in getattr(splits, name)] for name in ("train", "validation", "test")}
    for name, rows in texts.items():
        assert len(rows) == len(set(rows)), f"duplicates inside {name}"
        assert {r["label"] for r in getattr(splits, name)} == {0, 1}, name
    assert not set(texts["train"]) & set(texts["validation"]) and not set(texts["train"]) & set(texts["test"])
    assert not set(texts["validation"]) & set(texts["test"])


def test_tiny_sentiment_classifier_learns_with_full_report(tmp_path):
    proc = run_ftl("run", str(SENTIMENT), "--profile", "tiny", f"track.output_dir={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = eval_after(tmp_path)
    before, after = report["before"], report["after"]
    assert after["accuracy"] >= 0.58 and after["accuracy"] > before["accuracy"] + 0.1, (before, after)
    for metrics in (after, after["test"]):
        assert {"accuracy", "precision", "recall", "macro_f1", "confusion_matrix"} <= set(metrics)
        assert sum(map(sum, metrics["confusion_matrix"])) == metrics["examples"]
        assert metrics["classes"] == ["negative", "positive"]
    assert "Confusion matrix" in (tmp_path / "eval.md").read_text()
    config = json.loads((tmp_path / "final" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}
    assert any("eval/macro_f1" in row for row in read_jsonl(tmp_path / "metrics.jsonl"))


def test_head_only_trains_the_head_alone_and_keeps_the_model_bit_identical(tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification

    proc = run_ftl("run", str(SENTIMENT), "--profile", "tiny", f"track.output_dir={tmp_path}",
                   "classify.train_head_only=true", "train.max_steps=5", "eval.before_training=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    trainable = json.loads((tmp_path / "manifest.json").read_text())["trainable"]
    assert trainable["trainable_params"] == 64 * 2          # score head: hidden 64 x 2 labels, no bias
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2).state_dict()
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final").state_dict()
    body = [k for k in final if not k.startswith("score.")]
    assert body and all(torch.equal(base[k], final[k]) for k in body)
    assert not torch.equal(base["score.weight"], final["score.weight"])


def test_head_only_with_an_adapter_method_is_refused(tmp_path):
    proc = run_ftl("run", str(SENTIMENT), "--profile", "tiny", f"track.output_dir={tmp_path}",
                   "classify.train_head_only=true", "method.kind=lora", cwd=tmp_path)
    assert proc.returncode == 2 and "classify.train_head_only" in proc.stderr and "'lora'" in proc.stderr


def test_unknown_label_names_the_record_and_the_labels():
    assert label_id("positive", ["negative", "positive"], "x") == 1 and label_id(0, ["a", "b"], "x") == 0
    with pytest.raises(DataError, match=r"data record 7: label 'neutral' is not one of classify.labels"):
        label_id("neutral", ["negative", "positive"], "data record 7")


def labelled(*labels):
    return [{"text": f"text {i}", "label": label} for i, label in enumerate(labels)]


def no_labels_given():
    from types import SimpleNamespace

    return SimpleNamespace(classify=SimpleNamespace(labels=[]))


def test_labels_are_the_values_training_holds_not_a_range_up_to_the_largest():
    names = label_names(no_labels_given(), Splits(train=labelled(0, 1, 1, 0, 7), validation=labelled(1, 7)))
    assert names == ["0", "1", "7"]                                  # a 3-way head, not 8-way
    assert [label_id(v, names, "x") for v in (0, 1, 7)] == [0, 1, 2]
    names = label_names(no_labels_given(), Splits(train=labelled(2, 1, 10, "b", "a")))
    assert names == ["1", "2", "10", "a", "b"] and label_id(1, names, "x") == 0 and label_id(10, names, "x") == 2


def test_a_label_training_never_has_is_named_with_its_split_and_count():
    splits = Splits(train=labelled(0, 1, 0, 1), validation=labelled(0, 1), test=labelled(1, 2, 2, 3))
    with pytest.raises(DataError, match=r"the test split holds labels the training split never has: "
                                        r"'2' \(2 rows\), '3' \(1 rows\) \(training has \['0', '1'\]\)"):
        label_names(no_labels_given(), splits)
    with pytest.raises(DataError, match=r"the training split holds only label \['pos'\]"):
        label_names(no_labels_given(), Splits(train=labelled("pos", "pos")))


def test_classify_labels_given_in_the_recipe_win():
    recipe = load_recipe(SENTIMENT, "tiny")
    assert label_names(recipe, Splits(train=labelled(0, 0), test=labelled(1))) == ["negative", "positive"]


@pytest.mark.parametrize("empty", ["validation", "test"])
def test_classify_runs_without_a_validation_or_test_split_and_counts_truncation(tmp_path, empty):
    from transformers import AutoTokenizer

    proc = run_ftl("run", str(SENTIMENT), "--profile", "tiny", f"track.output_dir={tmp_path}",
                   f"data.split.{empty}=0", "data.limit=200", "data.max_length=24", "train.max_steps=2",
                   "eval.every=null", "eval.before_training=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "manifest.json").read_text())["data"]
    assert data["sizes"][empty] == 0 and data["rows"] == {"read": 200, "kept": 200, "skipped": {},
                                                          "first_skipped": []}
    splits, _ = load_splits(load_recipe(SENTIMENT, "tiny", [f"data.split.{empty}=0", "data.limit=200"]).data)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    longer = sum(len(ids) > 24 for ids in tokenizer([r["text"] for r in splits.train])["input_ids"])
    assert data["encoded"] == len(splits.train) and 0 < data["truncated"] == longer < len(splits.train)
    after = eval_after(tmp_path)["after"]
    assert ("test" in after) == (empty == "validation") and ("accuracy" in after) == (empty == "test")


def test_minilm_encoder_gets_a_topic_head_and_learns(tmp_path):
    proc = run_ftl("run", str(TOPIC), "--profile", "small", f"track.output_dir={tmp_path}", "train.max_steps=12",
                   "train.lr=5e-4", "eval.max_examples=96", "eval.every=null", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = eval_after(tmp_path)
    assert report["after"]["accuracy"] > report["before"]["accuracy"] + 0.2, report
    assert len(report["after"]["classes"]) >= 10                            # chatterbot topics
    assert json.loads((tmp_path / "final" / "config.json").read_text())["model_type"] == "bert"


def test_compare_reports_methods_against_scratch(tmp_path):
    # `make compare` runs all eight; here the four that span the table's cases (the other methods train in
    # test_methods), which halves the test's time
    assert list(load_recipe(COMPARED, "tiny").compare.variants) == [
        "full", "freeze_bottom", "head_only", "lora", "qlora", "prefix", "adapter", "scratch"]
    out = tmp_path / "compare"
    proc = run_ftl("compare", str(COMPARED), "--profile", "tiny", "--variants", "full,head_only,lora,scratch",
                   "--out", str(out), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["variant"]: r for r in json.loads((out / "compare.json").read_text())}
    assert list(rows) == ["full", "head_only", "lora", "scratch"]
    assert rows["full"]["trainable_share"] == rows["scratch"]["trainable_share"] == 1.0
    assert all(r["trainable_share"] < 1.0 for name, r in rows.items() if name not in ("full", "scratch"))
    assert rows["head_only"]["trainable_params"] < rows["lora"]["trainable_params"]
    assert all(r["peak_mb"] > 100 and r["planned_mb"] > 100 and r["seconds"] > 0 and r["curve"] for r in rows.values())
    assert all(0 <= r["test_accuracy"] <= 1 and 0 <= r["test_macro_f1"] <= 1 for r in rows.values())
    assert all(r["curve"][0][0] == 0 and r["curve"][-1][0] == 20 for r in rows.values())  # untrained → final
    assert rows["lora"]["lr"] == 5.0e-4 and rows["full"]["lr"] == 3.0e-3   # the variant's, else the profile's
    report = (out / "compare.md").read_text()
    assert "| scratch |" in report and "steps to target" in report and (out / "compare.png").exists()

    # a rerun (e.g. after a killed compare) reuses variants measured with the same overrides, runs none again
    log_stamp = (out / "full.log").stat().st_mtime_ns
    again = run_ftl("compare", str(COMPARED), "--profile", "tiny", "--variants", "full,lora",
                    "--out", str(out), cwd=tmp_path, timeout=120)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert again.stdout.count("reusing") == 2 and (out / "full.log").stat().st_mtime_ns == log_stamp
    assert json.loads((out / "compare.json").read_text()) == [rows["full"], rows["lora"]]


def test_scratch_init_keeps_the_architecture_and_drops_the_pretrained_weights():
    import torch

    from ftl.models.load import load_model, pretrained_dir

    recipe = load_recipe(TOPIC, "small")
    folder = pretrained_dir(recipe.model)
    pretrained = load_model(recipe.model, folder, head="sequence_classification", num_labels=3)
    torch.manual_seed(0)
    scratch = load_model(recipe.model.model_copy(update={"init": "scratch"}), folder,
                         head="sequence_classification", num_labels=3)
    a, b = pretrained.state_dict(), scratch.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    word = "bert.embeddings.word_embeddings.weight"
    assert not torch.allclose(a[word], b[word])


def test_scratch_with_an_adapter_method_is_refused():
    from ftl.errors import RecipeError

    with pytest.raises(RecipeError, match="model.init 'scratch'.*method.kind must be 'full', not 'lora'"):
        load_recipe(SENTIMENT, "small", ["model.init=scratch"])
