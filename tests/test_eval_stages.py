"""`ftl eval` scores each stage's output as its kind of model (issue #15): a classifier (accuracy, macro-F1,
confusion matrix), a reward model (pairwise accuracy, margin), a policy (reward and win rate against the
model it started from) and a language model; on the run's own split (`--split`) or a given file, and a
run directory or a bare model folder. The numbers must equal what each run reported for the same rows.

Tiny runs, in this process (one interpreter start): a tiny Llama saved as the "SFT model" the reward model
and the policies start from, then classify, reward, PPO, DPO, GRPO and SFT runs of a few steps each.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, tiny_recipe_dict, write_recipe
from ftl.cli import main

TINY = "model.tiny={hidden_size: 32, intermediate_size: 64, vocab_size: 400}"


def ftl(*argv) -> int:
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    return done.value.code


def run_recipe(recipe: Path, out: Path, *overrides, profile: str | None = "tiny") -> Path:
    assert ftl("run", recipe, *(["--profile", profile] if profile else []), f"track.output_dir={out}",
               f"launch.main_process_port={free_port()}", *overrides) == 0
    return out


def evaluated(*argv) -> dict:
    """`ftl eval ARGV --out OUT` (OUT is argv's last entry): the eval.json it wrote."""
    assert ftl("eval", *argv[:-1], "--out", argv[-1]) == 0
    return json.loads((Path(argv[-1]) / "eval.json").read_text())["eval"]


def reported(run: Path) -> dict:
    """What the run itself measured at its end."""
    return json.loads((run / "eval.json").read_text())["after"]


def own_split(run: Path, split: str) -> list[dict]:
    """The records the run evaluated on: its split, cut at eval.max_examples."""
    from ftl.config import load_recipe
    from ftl.data import load_splits

    recipe = load_recipe(run / "recipe.yaml")
    return getattr(load_splits(recipe.data)[0], split)[: recipe.eval.max_examples]


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An SFT-model stand-in (tiny Llama + tokenizer trained on the chatterbot conversations), and classify,
    reward and PPO runs from it, each with a test split. ~9 s."""
    from ftl.config import load_recipe
    from ftl.config.schema import TinyModelConfig
    from ftl.data import load_splits
    from ftl.models.load import record_texts
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("eval_stages")
    chats = load_splits(load_recipe(ROOT / "recipes" / "rlhf" / "sft.yaml", "tiny").data)[0].train
    tokenizer = train_tiny_tokenizer(list(record_texts(chats)), 400)
    build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, vocab_size=400), tokenizer,
                     seed=0).save_pretrained(tmp / "sft")
    tokenizer.save_pretrained(tmp / "sft")
    rlhf = ROOT / "recipes" / "rlhf"
    return {
        "tmp": tmp, "sft": tmp / "sft",
        "classify": run_recipe(ROOT / "recipes" / "classify_topic.yaml", tmp / "classify", TINY, "data.limit=600",
                               "train.max_steps=6", "eval.every=null", "eval.before_training=false"),
        "reward": run_recipe(rlhf / "reward.yaml", tmp / "reward", f"model.path={tmp / 'sft'}", "train.max_steps=4",
                             "data.split.test=0.1", "eval.max_examples=16"),
        "ppo": run_recipe(rlhf / "ppo.yaml", tmp / "ppo", f"model.path={tmp / 'sft'}",
                          f"reward.path={tmp / 'reward' / 'final'}", "train.max_steps=2", "ppo.rollout_batch=4",
                          "data.split.test=0.1", "eval.max_examples=4"),
    }


# -- classifier -------------------------------------------------------------------------------------
def same_classification(got: dict, expected: dict) -> None:
    assert got["examples"] == expected["examples"] > 0
    for key in ("accuracy", "macro_f1", "precision", "recall", "confusion_matrix", "classes"):
        assert got[key] == expected[key], key
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-5)


def test_classifier_on_a_file_of_its_test_rows_reproduces_the_runs_test_metrics(runs, tmp_path):
    run = runs["classify"]
    data = jsonl(tmp_path / "topics.jsonl", own_split(run, "test"))
    got = evaluated(run, "--data", data, tmp_path / "out")
    same_classification(got, reported(run)["test"])
    assert got["kind"] == "classifier" and got["stage"] == "classify" and got["data"] == str(data)
    assert "Confusion matrix" in (tmp_path / "out" / "eval.md").read_text()


def test_classifier_own_splits(runs, tmp_path):
    run = runs["classify"]
    same_classification(evaluated(run, "--split", "test", tmp_path / "test"), reported(run)["test"])
    same_classification(evaluated(run, tmp_path / "validation"), reported(run))  # --split validation: the default


def test_classifier_model_folder_reads_its_label_names_from_the_config(runs, tmp_path):
    from transformers import AutoTokenizer

    run = runs["classify"]
    # a folder has no recipe: rows are cut at the default data.max_length (512), the run's at 96; rows
    # shorter than both are scored alike
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    short = [r for r in own_split(run, "test") if len(tokenizer(r["text"]).input_ids) < 96]
    data = jsonl(tmp_path / "topics.jsonl", short)
    folder = evaluated(run / "final", "--data", data, tmp_path / "folder")
    same_classification(folder, evaluated(run, "--data", data, tmp_path / "run"))
    assert folder["classes"] and set(folder["classes"]) <= set(json.loads((run / "labels.json").read_text()))


def test_adapter_classifier_gets_its_trained_head_back_on_the_base(tmp_path):
    run = run_recipe(ROOT / "recipes" / "classify_topic.yaml", tmp_path / "lora", TINY, "data.limit=600",
                     "method.kind=lora", "train.max_steps=3", "eval.every=null", "eval.before_training=false")
    assert (run / "final" / "adapter_config.json").exists() and not (run / "final" / "model.safetensors").exists()
    same_classification(evaluated(run, "--split", "test", tmp_path / "out"), reported(run)["test"])


# -- reward model -----------------------------------------------------------------------------------
def same_pairs(got: dict, expected: dict) -> None:
    assert got["pairs"] == expected["pairs"] > 0
    assert got["pairwise_accuracy"] == expected["pairwise_accuracy"]
    assert got["mean_margin"] == pytest.approx(expected["mean_margin"], abs=1e-6)
    assert got["loss"] == pytest.approx(expected["loss"], abs=1e-6)


def test_reward_model_on_a_file_of_its_validation_pairs_reproduces_the_run(runs, tmp_path):
    run = runs["reward"]  # a pipeline share (index 1 of 3): the file is read whole, not re-shared
    data = jsonl(tmp_path / "pairs.jsonl", own_split(run, "validation"))
    got = evaluated(run, "--data", data, tmp_path / "out")
    same_pairs(got, reported(run))
    assert got["kind"] == "reward_model"


def test_reward_model_folder(runs, tmp_path):
    from transformers import AutoTokenizer

    from ftl.data.tokenize import render_pair

    run = runs["reward"]  # a folder is cut at the default data.max_length (512), the run at 192: short pairs
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    short = [r for r in own_split(run, "validation")
             if max(len(tokenizer(render_pair(tokenizer, r["prompt"], r[side])).input_ids)
                    for side in ("chosen", "rejected")) < 192]
    data = jsonl(tmp_path / "pairs.jsonl", short)
    folder = evaluated(run / "final", "--data", data, tmp_path / "folder")  # --format: preference, the only one
    same_pairs(folder, evaluated(run, "--data", data, tmp_path / "run"))
    assert folder["kind"] == "reward_model" and folder["stage"] == "reward"


def test_reward_model_own_splits(runs, tmp_path):
    run = runs["reward"]
    same_pairs(evaluated(run, tmp_path / "validation"), reported(run))
    test = evaluated(run, "--split", "test", tmp_path / "test")
    data = jsonl(tmp_path / "test.jsonl", own_split(run, "test"))
    same_pairs(test, evaluated(run, "--data", data, tmp_path / "test_file"))
    assert test["data"] == "test split"


# -- policies -----------------------------------------------------------------------------------------
COMPARED = ("mean_reward", "reference_mean_reward", "mean_raw_score", "reference_mean_raw_score", "win_rate",
            "kl_to_reference", "eos_fraction", "responses")


def same_comparison(got: dict, expected: dict) -> None:
    """Same prompts, same seed (the comparison seeds its sampling), same weights: the same responses."""
    assert 0 <= got["win_rate"] <= 1 and got["responses"] > 0
    for key in COMPARED:
        assert got[key] == pytest.approx(expected[key], abs=1e-6), key
    assert [s["generation"] for s in got["samples"]] == [s["generation"] for s in expected["samples"]]


def test_ppo_policy_on_a_file_of_its_prompts_reproduces_the_runs_comparison(runs, tmp_path):
    run = runs["ppo"]
    data = jsonl(tmp_path / "prompts.jsonl", own_split(run, "validation"))
    got = evaluated(run, "--data", data, tmp_path / "out")
    same_comparison(got, reported(run))
    assert got["kind"] == "policy" and got["stage"] == "ppo"
    same_comparison(evaluated(run, tmp_path / "validation"), reported(run))
    test = evaluated(run, "--split", "test", tmp_path / "test")
    assert test["responses"] == 4 * len(own_split(run, "test")) and 0 <= test["win_rate"] <= 1


@pytest.fixture(scope="module")
def trl_runs(runs) -> dict[str, Path]:
    """DPO and GRPO (TRL trainers) from the same model, rated by the same reward model. ~3 s."""
    tmp, rlhf = runs["tmp"], ROOT / "recipes" / "rlhf"
    return {stage: run_recipe(rlhf / f"{stage}.yaml", tmp / stage, f"model.path={runs['sft']}",
                              f"reward.path={runs['reward'] / 'final'}", "train.max_steps=2", "eval.max_examples=4")
            for stage in ("dpo", "grpo")}


@pytest.mark.parametrize("stage", ["dpo", "grpo"])
def test_trl_policies_reproduce_their_runs_comparison(trl_runs, tmp_path, stage):
    run = trl_runs[stage]
    got = evaluated(run, tmp_path / "out")
    same_comparison(got, reported(run))
    assert got["stage"] == stage and got["kind"] == "policy"


# -- language model -----------------------------------------------------------------------------------
def test_language_model_own_test_split_and_bare_prompts(runs, tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "sft", data={"split": {"validation": 0.1, "test": 0.1}},
                              train={"max_steps": 2, "save_every": None})
    run = run_recipe(write_recipe(tmp_path / "sft.yaml", recipe), tmp_path / "sft", profile=None)
    test = evaluated(run, "--split", "test", tmp_path / "test")
    data = jsonl(tmp_path / "test.jsonl", own_split(run, "test"))
    from_file = evaluated(run, "--data", data, tmp_path / "file")
    assert test["kind"] == "language_model" and test["examples"] == from_file["examples"] > 0
    assert test["tokens"] == from_file["tokens"] and test["loss"] == pytest.approx(from_file["loss"], abs=1e-6)
    prompts = jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Hello, how are you?"}, {"prompt": "What is AI?"}])
    only = evaluated(run, "--data", prompts, "--format", "prompts", tmp_path / "prompts")
    assert "loss" not in only and only["examples"] == 2 and only["samples"][0]["prompt"].endswith("assistant\n")


# -- refusals -----------------------------------------------------------------------------------------
def refused(capsys, argv: list, expected: str) -> str:
    assert ftl("eval", *argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftl: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


def test_a_format_the_model_cannot_score_is_refused_naming_the_file_and_what_fits(runs, tmp_path, capsys):
    chats = jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello"}]}])
    refused(capsys, [runs["reward"], "--data", chats, "--format", "chat"],
            f"--data {chats}: {runs['reward']} holds a reward model (stage 'reward'); it scores 'preference' "
            "(prompt, chosen, rejected) rows, not 'chat'")
    refused(capsys, [runs["classify"], "--data", chats, "--format", "chat"],
            "it scores 'classification' (text, label) rows, not 'chat'")
    refused(capsys, [runs["ppo"], "--data", chats, "--format", "classification"],
            "holds a policy (stage 'ppo'); it scores prompts, chat, prompt_completion or preference")
    refused(capsys, [runs["reward"] / "final", "--data", chats, "--format", "chat"],
            "is a reward-model folder (one-output sequence classifier); it scores 'preference'")
    refused(capsys, [runs["classify"] / "final"], "is a sequence-classifier folder: give --data FILE")
    refused(capsys, [runs["classify"], "--data", chats, "--format", "text"],
            "it scores 'classification' (text, label) rows, not 'text'")
    # auto: refused once the rows are read and turn out to be a kind the model cannot score
    refused(capsys, [runs["reward"], "--data", chats, "--format", "auto"],
            f"--data {chats}: {runs['reward']} holds a reward model (stage 'reward'); it scores 'preference' "
            "(prompt, chosen, rejected) rows, not 'auto' (chat records)")
    refused(capsys, [runs["classify"] / "final", "--data", chats, "--format", "auto"],
            "is a sequence-classifier folder; it scores 'classification' (text, label) rows, not 'auto' (chat records)")


def test_a_judge_reward_is_refused_where_it_cannot_rescore_a_policy(runs, capsys):
    judge = runs["reward"] / "final"
    refused(capsys, [runs["classify"], "--reward", judge],
            f"--reward {judge}: it rescores a policy's responses; {runs['classify']} holds a classifier")
    refused(capsys, [runs["ppo"], "--reward", runs["classify"] / "final"],
            "expected a reward-model folder (a reward stage's final/ or merged/: a one-output sequence classifier)")
    refused(capsys, [runs["ppo"] / "final", "--reward", judge], "is a model folder; give a policy's run directory")


def test_prompts_from_another_run_is_refused_unless_both_are_policy_runs(runs, capsys):
    refused(capsys, [runs["classify"], "--prompts-from", runs["ppo"]],
            f"--prompts-from {runs['ppo']}: it compares policies on the same prompts; {runs['classify']} holds a "
            "classifier")
    refused(capsys, [runs["ppo"], "--prompts-from", runs["reward"]],
            f"--prompts-from {runs['reward']}: expected a policy's run directory (ppo, dpo or grpo), not a reward run")
    refused(capsys, [runs["ppo"], "--prompts-from", runs["ppo"] / "final"], "not a model folder")
    refused(capsys, [runs["ppo"] / "final", "--prompts-from", runs["ppo"]], "is a model folder; give a policy's run")
    refused(capsys, [runs["ppo"], "--prompts-from", runs["ppo"], "--data", runs["ppo"] / "recipe.yaml"],
            "--prompts-from and --data both choose the prompts: give one")


def test_an_empty_split_and_a_policy_without_a_reward_are_refused(runs, trl_runs, tmp_path, capsys):
    refused(capsys, [trl_runs["dpo"], "--split", "test"], "the run's test split is empty (data.split.test: 0.0)")
    unrated = tmp_path / "dpo"
    shutil.copytree(trl_runs["dpo"], unrated, ignore=shutil.ignore_patterns("checkpoints", "trl"))
    recipe = yaml.safe_load((unrated / "recipe.yaml").read_text())
    recipe.pop("reward")
    (unrated / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    refused(capsys, [unrated], "a 'dpo' run without a 'reward' section: nothing scores its responses")
