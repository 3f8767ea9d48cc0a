"""Pre-split data (data.splits) and several sources mixed by weight (data.sources): given splits are used as
they are, overlap is counted, the mix keeps its shares and is the same every run, the manifest says what each
source gave, and one tiny end-to-end run scores its given test file at the end."""

import json
from collections import Counter

import pytest

from conftest import tiny_recipe_dict, write_recipe
from ftl.config import load_recipe
from ftl.config.schema import DataConfig
from ftl.data import load_splits
from ftl.data.mix import mix_counts
from ftl.errors import DataError, RecipeError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def pairs(tag, n, start=0):
    return [{"prompt": f"{tag} question {i}", "completion": f"{tag} answer {i}"} for i in range(start, start + n)]


def data_cfg(**data):
    return DataConfig.model_validate({"format": "prompt_completion", **data})


# -- data.splits --------------------------------------------------------------------------------------
def test_given_splits_are_used_as_they_are(tmp_path):
    validation, test = pairs("val", 7), pairs("test", 5) + pairs("test", 1)  # a duplicate too: kept
    splits, report = load_splits(data_cfg(splits={
        "train": {"kind": "jsonl", "path": write_jsonl(tmp_path / "train.jsonl", pairs("train", 40))},
        "validation": {"kind": "jsonl", "path": write_jsonl(tmp_path / "val.jsonl", validation)},
        "test": {"kind": "jsonl", "path": write_jsonl(tmp_path / "test.jsonl", test)}}))
    assert splits.validation == validation and splits.test == test  # same rows, same order
    assert len(splits.train) == 40  # nothing hash-split off the training file
    assert report.overlap == {"train/validation": 0, "train/test": 0, "validation/test": 0}
    assert [(s["key"], s["split"], s["read"], s["used"]) for s in report.as_manifest()["sources"]] == [
        ("data.splits.train", "train", 40, 40), ("data.splits.validation", "validation", 7, 7),
        ("data.splits.test", "test", 6, 6)]


def test_a_missing_split_is_hash_split_from_train(tmp_path):
    test = pairs("test", 5)
    splits, _ = load_splits(data_cfg(
        source={"kind": "jsonl", "path": write_jsonl(tmp_path / "train.jsonl", pairs("train", 200))},
        splits={"test": {"kind": "jsonl", "path": write_jsonl(tmp_path / "test.jsonl", test)}},
        split={"validation": 0.2}))
    assert splits.test == test
    assert 20 < len(splits.validation) < 60 and len(splits.train) + len(splits.validation) == 200
    assert all(r["prompt"].startswith("train") for r in splits.validation)


def test_overlap_between_given_splits_is_counted_and_warned_not_removed(tmp_path):
    train = pairs("q", 30)
    validation = pairs("q", 3) + pairs("v", 4)  # 3 records identical to training records
    test = pairs("q", 1, start=29) + pairs("v", 2)  # 1 in train, 2 in validation
    splits, report = load_splits(data_cfg(
        source={"kind": "jsonl", "path": write_jsonl(tmp_path / "train.jsonl", train)},
        splits={"validation": {"kind": "jsonl", "path": write_jsonl(tmp_path / "val.jsonl", validation)},
                "test": {"kind": "jsonl", "path": write_jsonl(tmp_path / "test.jsonl", test)}}))
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (30, 7, 3)
    assert report.as_manifest()["overlap"] == {"train/validation": 3, "train/test": 1, "validation/test": 2}
    assert report.notes() == ["ftl: warning: data.splits overlap: 3 validation records also in train, 1 test "
                              "record also in train, 2 test records also in validation (identical records; given "
                              "splits are used as they are)"]


# -- data.sources -------------------------------------------------------------------------------------
def two_sources(tmp_path, weights=(0.7, 0.3), strategy="first_exhausted", seed=0, sizes=(300, 300)):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a task {i}", "input": "", "output": f"a {i}"}
                                           for i in range(sizes[0])])
    b = write_jsonl(tmp_path / "b.jsonl", [{"conversations": [{"from": "human", "value": f"b question {i}"},
                                                              {"from": "gpt", "value": f"b answer {i}"}]}
                                           for i in range(sizes[1])])
    return DataConfig.model_validate({
        "sources": [{"kind": "jsonl", "path": a, "weight": weights[0]},
                    {"kind": "jsonl", "path": b, "format": "sharegpt", "weight": weights[1]}],
        "format": "auto", "split": {"validation": 0.1}, "mix": {"stopping_strategy": strategy, "seed": seed}})


def origin(record) -> str:
    return "b" if "messages" in record else "a"


def test_weights_are_shares_of_the_training_examples_and_the_mix_is_the_same_every_run(tmp_path):
    splits, report = load_splits(two_sources(tmp_path))
    counts = Counter(origin(r) for r in splits.train)
    assert abs(counts["a"] / len(splits.train) - 0.7) < 0.01
    assert len(set(json.dumps(r) for r in splits.train)) == len(splits.train)  # first_exhausted: no repeats
    sources = report.as_manifest()["sources"]
    assert [s["format"] for s in sources] == ["alpaca", "sharegpt"]
    assert [s["read"] for s in sources] == [300, 300] and [s["kept"] for s in sources] == [300, 300]
    assert [s["used"] for s in sources] == [counts["a"], counts["b"]]
    assert sources[0]["used"] == 300 - sources[0]["held_out"]["validation"]  # the source that runs out first
    again, _ = load_splits(two_sources(tmp_path))
    assert again.train == splits.train and again.validation == splits.validation
    other_seed, _ = load_splits(two_sources(tmp_path, seed=1))
    assert other_seed.train != splits.train and Counter(map(origin, other_seed.train)) == counts


def test_all_exhausted_uses_every_example_repeating_the_smaller_share(tmp_path):
    splits, report = load_splits(two_sources(tmp_path, weights=(1, 1), strategy="all_exhausted", sizes=(200, 50)))
    counts = Counter(origin(r) for r in splits.train)
    assert counts["a"] == counts["b"]
    assert len({json.dumps(r) for r in splits.train if origin(r) == "b"}) == \
        50 - report.sources[1].held_out["validation"]  # every b example, each about four times


@pytest.mark.parametrize("sizes, weights, strategy, expected", [
    ((100, 100), (0.7, 0.3), "first_exhausted", [100, 43]),
    ((100, 100), (0.7, 0.3), "all_exhausted", [233, 100]),
    ((1000, 10), (0.5, 0.5), "first_exhausted", [10, 10]),
    ((30, 70), (3, 7), "first_exhausted", [30, 70]),
])
def test_mix_counts(sizes, weights, strategy, expected):
    assert mix_counts(list(sizes), list(weights), strategy) == expected


def test_a_source_that_gives_nothing_to_the_mix_is_named(tmp_path):
    cfg = two_sources(tmp_path)
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=r"data\.sources\[1\]: no training records from jsonl source .*b\.jsonl; "
                                        r"it holds no rows"):
        load_splits(cfg)


# -- the recipe keys --------------------------------------------------------------------------------
@pytest.mark.parametrize("data, problem", [
    ({"source": {"kind": "jsonl", "path": "a"}, "sources": [{"kind": "jsonl", "path": "b"}]},
     r"data\.source and data\.sources each give the training data: keep one"),
    ({"sources": [{"kind": "jsonl", "path": "a"}], "splits": {"train": {"kind": "jsonl", "path": "b"}}},
     r"data\.sources and data\.splits\.train each give the training data"),
    ({"splits": {"test": {"kind": "jsonl", "path": "b"}}}, r"no training data: set data\.source, data\.sources or"),
    ({"source": {"kind": "jsonl", "path": "a", "weight": 2}}, r"data\.source\.weight: a weight shares"),
    ({"sources": [{"kind": "jsonl", "path": "a", "weight": 2}, {"kind": "jsonl", "path": "b"}]},
     r"data\.sources\[1\] has no weight while others do"),
    ({"source": {"kind": "jsonl", "path": "a"}, "split": {"validation": 0.2},
      "splits": {"validation": {"kind": "jsonl", "path": "b"}}},
     r"data\.split\.validation \(a share hash-split from train\) and data\.splits\.validation \(a given file\)"),
    ({"source": {"kind": "chatterbot"}, "format": "auto"}, r"source kind 'chatterbot' builds its rows in the format"),
    ({"sources": [{"kind": "jsonl", "path": "a", "weight": 0}]}, r"weight: Input should be greater than 0"),
])
def test_data_keys_that_contradict_each_other_are_named(tmp_path, data, problem):
    recipe = tiny_recipe_dict(tmp_path / "run")
    recipe["data"] = {"format": "chat", **data}
    with pytest.raises(RecipeError, match=problem):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


def test_a_stage_check_uses_each_source_format(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", stage="reward")
    recipe["data"] = {"format": "preference", "sources": [{"kind": "jsonl", "path": "a"},
                                                           {"kind": "jsonl", "path": "b", "format": "alpaca"}]}
    with pytest.raises(RecipeError, match=r"stage 'reward' trains on data\.format 'preference'.*not 'alpaca' "
                                          r"\(prompt_completion records\)"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe))


# -- end to end --------------------------------------------------------------------------------------
def test_a_tiny_run_on_mixed_sources_and_given_splits_scores_its_test_file(tmp_path, capsys):
    from ftl.cli import main

    words = ["red", "green", "blue", "small", "large", "cat", "dog", "bird"]
    alpaca = [{"instruction": f"describe the {a} {b}", "input": "", "output": f"the {b} is {a}"}
              for a in words for b in words]
    chats = [{"conversations": [{"from": "human", "value": f"is the {b} {a}?"}, {"from": "gpt", "value": f"yes, {a}"}]}
             for a in words for b in words]
    validation = [{"messages": [{"role": "user", "content": f"what colour is the {b}?"},
                                {"role": "assistant", "content": f"{a}"}]} for a in words[:3] for b in words[5:]]
    test = [{"prompt": [{"role": "user", "content": f"name a {a} thing"}], "completion": [
        {"role": "assistant", "content": f"a {a} {b}"}]} for a in words[:3] for b in words[5:]]
    recipe = tiny_recipe_dict(tmp_path / "run", train={"max_steps": 3, "save_every": None},
                              eval={"max_examples": 8, "generate": {"from_validation": 1, "max_new_tokens": 2}})
    recipe["data"] = {"format": "auto", "max_length": 64, "sources": [
        {"kind": "jsonl", "path": write_jsonl(tmp_path / "alpaca.jsonl", alpaca), "weight": 0.75},
        {"kind": "jsonl", "path": write_jsonl(tmp_path / "chats.jsonl", chats), "weight": 0.25}],
        "splits": {"validation": {"kind": "jsonl", "path": write_jsonl(tmp_path / "val.jsonl", validation)},
                   "test": {"kind": "jsonl", "path": write_jsonl(tmp_path / "test.jsonl", test)}}}
    with pytest.raises(SystemExit) as done:
        main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "ftl: data.sources[0].format auto -> alpaca from columns instruction, output, input" in out
    assert "ftl: data.splits.test.format auto -> prompt_completion (conversational) from columns prompt, " \
           "completion" in out
    data = json.loads((tmp_path / "run" / "manifest.json").read_text())["data"]
    assert data["sizes"] == {"train": 85, "validation": 9, "test": 9}  # 64 alpaca whole, 21 chats: 3 to 1
    assert [(s["key"], s["format"], s["used"]) for s in data["sources"]] == [
        ("data.sources[0]", "alpaca", 64), ("data.sources[1]", "sharegpt", 21),
        ("data.splits.validation", "chat", 9), ("data.splits.test", "prompt_completion", 9)]
    assert data["overlap"] == {"train/validation": 0, "train/test": 0, "validation/test": 0}
    after = json.loads((tmp_path / "run" / "eval.json").read_text())["after"]
    assert after["test"]["loss"] > 0 and after["loss"] > 0  # the test file scored beside validation


@pytest.mark.parametrize("stage, metric", [("reward", "pairwise_accuracy"), ("dpo", "rewards/accuracies")])
def test_preference_runs_on_implicit_prompt_conversations_score_their_given_test_file(tmp_path, capsys, stage,
                                                                                      metric):
    from ftl.cli import main

    def pair(question, good, bad):
        ask = {"role": "user", "content": question}
        return {"chosen": [ask, {"role": "assistant", "content": good}],
                "rejected": [ask, {"role": "assistant", "content": bad}]}

    words = ["red", "green", "blue", "cat", "dog", "bird"]
    train = [pair(f"is the {b} {a}?", f"yes, the {b} is {a}", "no idea") for a in words for b in words]
    test = [pair(f"what is {a}?", f"{a} is a word", "nothing") for a in words]
    recipe = tiny_recipe_dict(tmp_path / "run", stage=stage, train={"max_steps": 2, "save_every": None},
                              eval={"max_examples": 6})
    recipe["data"] = {"format": "auto", "max_length": 64, "split": {"validation": 0.2},
                      "source": {"kind": "jsonl", "path": write_jsonl(tmp_path / "train.jsonl", train)},
                      "splits": {"test": {"kind": "jsonl", "path": write_jsonl(tmp_path / "test.jsonl", test)}}}
    with pytest.raises(SystemExit) as done:
        main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    out = capsys.readouterr().out
    assert done.value.code == 0, out
    assert "ftl: data.format auto -> preference (implicit prompt, conversational) from columns chosen, rejected" in out
    after = json.loads((tmp_path / "run" / "eval.json").read_text())["after"]
    assert metric in after and metric in after["test"]
    assert after["test"].get("pairs", 6) == 6
