"""RLHF end to end on the tiny profile: the SFT → reward model → PPO pipeline, PPO on a known reward,
PPO on 2 ranks, pipeline skipping and failure."""

import json

import pytest
import yaml

from conftest import ROOT, copy_rlhf_pipeline, read_jsonl, run_ftl, free_port
from ftl.pipeline.policies import finished_cell

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rlhf")
    path = copy_rlhf_pipeline(tmp)
    proc = run_ftl("pipeline", str(path), "--profile", "tiny", cwd=tmp, timeout=600)  # ~1 min
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, path, tmp / "out"


def test_pipeline_hands_artifacts_on_and_ppo_raises_the_reward(pipeline_run):
    _, _, out = pipeline_run
    for stage in ("sft", "reward", "ppo"):
        assert (out / stage / "final").is_dir() and (out / stage / "stage.json").exists()
    ppo_recipe = yaml.safe_load((out / "ppo" / "recipe.yaml").read_text())
    assert ppo_recipe["model"]["path"] == str(out / "sft" / "final")
    assert ppo_recipe["reward"]["path"] == str(out / "reward" / "final")
    reward_eval = json.loads((out / "reward" / "eval.json").read_text())["after"]
    assert reward_eval["pairwise_accuracy"] > 0.6 and reward_eval["mean_margin"] > 0
    rewards = [r["reward"] for r in read_jsonl(out / "ppo" / "metrics.jsonl")]
    # RM score + missing-EOS penalty, mean of the first vs last 5 steps: measured 0.39 -> 0.86 (noisy per step)
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.2, rewards
    ppo_eval = json.loads((out / "ppo" / "eval.json").read_text())["after"]
    # 64 held-out responses vs the SFT model's: measured 1.04 vs 0.65, win rate 0.66; on a later machine the
    # same seeds and packages gave 0.79 vs 0.54, win rate 0.52 (fewer finished answers: 0.23 vs 0.44)
    assert ppo_eval["mean_reward"] > ppo_eval["reference_mean_reward"] + 0.2 and ppo_eval["win_rate"] > 0.5
    assert 0 < ppo_eval["kl_to_reference"] < 10 and 0 <= ppo_eval["echo_fraction"] <= 1
    manifest = json.loads((out / "ppo" / "manifest.json").read_text())
    prompt = manifest["memory"]["planned"]["lengths"]["prompt"]  # the prompts' longest, as the stage tokenised
    assert 0 < prompt < ppo_recipe["data"]["max_length"]
    # auto decided for the rollouts the data gives, not for data.max_length-token prompts
    assert f"rollouts 8 x ({prompt} + 12) tokens" in manifest["gradient_checkpointing"]["reason"]
    for key in ("reward", "kl", "entropy", "value_loss", "policy_loss", "clip_fraction", "response_length",
                "generation_seconds", "training_seconds"):
        assert key in read_jsonl(out / "ppo" / "metrics.jsonl")[0], key
    report = (out / "pipeline_report.md").read_text()
    assert "| ppo | ran |" in report and "win_rate" in report and "ppo/curves.png" in report
    dpo_eval = json.loads((out / "dpo" / "eval.json").read_text())["after"]  # the alternative, same report
    assert "| dpo | ran |" in report and {"rewards/accuracies", "mean_reward", "win_rate"} <= set(dpo_eval)
    grpo_eval = json.loads((out / "grpo" / "eval.json").read_text())["after"]
    assert "| grpo | ran |" in report and grpo_eval["kl_to_reference"] > 0 and "win_rate" in grpo_eval
    for stage in ("rloo", "reinforce_pp"):  # critic-free, on PPO's machinery: no value model
        own = json.loads((out / stage / "eval.json").read_text())["after"]
        assert "win_rate" in own and "value_loss" not in read_jsonl(out / stage / "metrics.jsonl")[0], stage
    grpo_rows = read_jsonl(out / "grpo" / "metrics.jsonl")
    assert len(grpo_rows) == 6 and all("reward" in r and "kl" in r for r in grpo_rows)
    dpo_rows = read_jsonl(out / "dpo" / "metrics.jsonl")[1:]  # step 1: policy == reference, margin 0
    assert sum(r["rewards/margins"] for r in dpo_rows) > 0 and \
        sum(r["rewards/accuracies"] for r in dpo_rows) / len(dpo_rows) > 0.5, dpo_rows


def test_every_policy_is_judged_on_common_prompts_by_a_reward_model_no_stage_saw(pipeline_run):
    _, _, out = pipeline_run
    report = (out / "pipeline_report.md").read_text()
    table = report.split("## Policies side by side")[1]
    assert "Every policy on the same held-out prompts" in table and "those of stage 'ppo'" in table and \
        "(64 responses per policy)" in table, table
    references = set()
    for stage in ("ppo", "rloo", "reinforce_pp", "dpo", "grpo"):
        own = json.loads((out / stage / "eval.json").read_text())["after"]
        judged = json.loads((out / stage / "judge" / "eval.json").read_text())["eval"]
        assert judged["judged_by"] == str(out / "judge" / "final") and judged["prompts_from"] == str(out / "ppo")
        proxy = judged["run_reward"]  # the stage's own reward model on the same responses
        assert judged["mean_raw_score"] != proxy["mean_raw_score"]  # another model scored them
        # one reference for all: the SFT model's responses to the same prompts, drawn alike
        references.add((tuple(s["reference"] for s in judged["samples"]), judged["reference_mean_raw_score"],
                        proxy["reference_mean_reward"]))
        if stage == "ppo":  # the first stage's prompts: the very responses its own comparison scored
            assert [s["generation"] for s in judged["samples"]] == [s["generation"] for s in own["samples"]]
            assert judged["kl_to_reference"] == pytest.approx(own["kl_to_reference"], rel=1e-4)
            assert proxy["win_rate"] == own["win_rate"]
        if stage == "dpo":  # its own comparison drew its preference share's prompts
            assert [s["prompt"] for s in judged["samples"]] != [s["prompt"] for s in own["samples"]]
        row = next(line for line in table.splitlines() if line.startswith(f"| {stage} |"))
        assert f"{proxy['win_rate']:.2f}" in row and f"{judged['win_rate']:.2f}" in row, row
        assert f"{judged['kl_to_reference']:.3f}" in row, row
        assert f"| {finished_cell(judged)} |" in row and 0 <= judged["finished_pairs"] <= judged["responses"], row
        manifest = json.loads((out / stage / "manifest.json").read_text())
        assert f"{manifest['memory']['peak_bytes'] / 2**30:.2f}" in row, row
    assert len(references) == 1, references
    assert "| rloo | rloo |" in table and "| reinforce_pp | reinforce_pp |" in table and "| ppo | gae |" in table
    assert "judge" not in [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("|")]


def test_stages_use_disjoint_shares_of_the_data(pipeline_run):
    _, _, out = pipeline_run
    from ftl.config import load_recipe
    from ftl.data import load_splits

    prompts = {}
    for stage in ("sft", "reward", "ppo", "judge"):
        splits, _ = load_splits(load_recipe(out / stage / "recipe.yaml").data)
        records = splits.train + splits.validation + splits.test
        prompts[stage] = {r.get("prompt") or r["messages"][0]["content"] for r in records}
        assert prompts[stage]
    assert not prompts["sft"] & prompts["reward"] and not prompts["sft"] & prompts["ppo"]
    assert not prompts["reward"] & prompts["ppo"]
    assert not prompts["judge"] & (prompts["sft"] | prompts["reward"] | prompts["ppo"])  # no stage saw its pairs


def test_rerun_skips_unchanged_stages_and_reruns_changed_ones(pipeline_run):
    tmp, path, out = pipeline_run
    again = run_ftl("pipeline", str(path), "--profile", "tiny", cwd=tmp, timeout=300)
    assert again.returncode == 0 and again.stdout.count("unchanged and complete: skipped") == 8
    assert "judging stage" not in again.stdout  # unchanged stages and judge: their judgements stand
    spec = yaml.safe_load(path.read_text())
    next(s for s in spec["stages"] if s["name"] == "ppo")["overrides"] = ["ppo.kl_coef=0.1", "train.max_steps=3"]
    path.write_text(yaml.safe_dump(spec))
    changed = run_ftl("pipeline", str(path), "--profile", "tiny", cwd=tmp, timeout=600)
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert "stage 'sft' unchanged" in changed.stdout and "stage 'reward' unchanged" in changed.stdout
    assert "stage 'ppo' running" in changed.stdout and "stage 'dpo' unchanged" in changed.stdout
    assert "judging stage 'ppo'" in changed.stdout and "judging stage 'dpo'" not in changed.stdout
    assert len(read_jsonl(out / "ppo" / "metrics.jsonl")) == 3


def test_a_failed_stage_stops_the_pipeline_and_is_named(tmp_path):
    spec = yaml.safe_load(copy_rlhf_pipeline(tmp_path).read_text())
    spec["stages"][1]["overrides"] = ["data.limit=1"]  # leaves no training pair: the stage fails at run time
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(spec))
    proc = run_ftl("pipeline", str(tmp_path / "pipeline.yaml"), "--profile", "tiny", cwd=tmp_path, timeout=600)
    assert proc.returncode == 2
    assert "stage 'reward' failed" in proc.stderr and "later stages not run" in proc.stderr
    assert not (tmp_path / "out" / "ppo").exists()


def test_ppo_raises_a_known_reward_while_kl_stays_bounded(pipeline_run, tmp_path):
    _, _, out = pipeline_run
    proc = run_ftl("run", str(ROOT / "recipes" / "rlhf" / "ppo.yaml"), "--profile", "tiny",
                   f"model.path={out / 'sft' / 'final'}", f"track.output_dir={tmp_path / 'ppo'}",
                   "reward={kind: function, function: 'ftl.rl.reward_functions:count_substring', "
                   "kwargs: {target: e}}", "reward.missing_eos_penalty=null", "ppo.value_from=policy",
                   "ppo.kl_coef=0.1", "train.max_steps=30", "train.lr=5e-4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    rewards, kls = [r["reward"] for r in rows], [r["kl"] for r in rows]
    assert sum(rewards[-5:]) / 5 > sum(rewards[:5]) / 5 + 0.8, rewards
    assert max(kls) < 8.0, kls  # the KL penalty keeps the policy near the reference (measured: at most 6.6)
    result = json.loads((tmp_path / "ppo" / "eval.json").read_text())["after"]
    assert result["mean_reward"] > result["reference_mean_reward"] + 0.8 and result["win_rate"] > 0.65


def test_grpo_plans_for_its_prompts_when_checkpointing_is_set(pipeline_run, tmp_path):
    """With checkpointing set (not auto, so not decided from the data) GRPO still plans its peak for the
    prompts it tokenised, not data.max_length's: on small that was 47.8 GiB planned for 9.3 measured."""
    _, _, out = pipeline_run
    proc = run_ftl("run", str(ROOT / "recipes" / "rlhf" / "grpo.yaml"), "--profile", "tiny",
                   f"model.path={out / 'sft' / 'final'}", f"reward.path={out / 'reward' / 'final'}",
                   f"track.output_dir={tmp_path / 'grpo'}", "model.gradient_checkpointing=false",
                   "train.max_steps=1", "eval.max_examples=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "grpo" / "manifest.json").read_text())
    ppo_prompt = json.loads((out / "ppo" / "manifest.json").read_text())["memory"]["planned"]["lengths"]["prompt"]
    assert manifest["memory"]["planned"]["lengths"]["prompt"] == ppo_prompt > 0  # the same prompt share


def test_ppo_on_two_ranks_with_a_lora_policy(pipeline_run, tmp_path):
    _, _, out = pipeline_run
    proc = run_ftl("launch", str(ROOT / "recipes" / "rlhf" / "ppo.yaml"), "--profile", "tiny",
                   f"model.path={out / 'sft' / 'final'}", f"reward.path={out / 'reward' / 'final'}",
                   f"track.output_dir={tmp_path / 'ppo2'}", "launch.num_processes=2",
                   f"launch.main_process_port={free_port()}", "method.kind=lora", "train.max_steps=4",
                   "ppo.rollout_batch=4", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "ppo2" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["ppo"]["reference"] == "disabled_adapter"
    checks = manifest["rank_checks"]
    assert len({c["param_digest"] for c in checks}) == 1  # policy replicas stayed in sync
    rows = read_jsonl(tmp_path / "ppo2" / "metrics.jsonl")
    assert len(rows) == 4 and all(r["episodes"] == 8 for r in rows)
    assert (tmp_path / "ppo2" / "final" / "adapter_config.json").exists()


def test_ppo_under_zero3_keeps_half_of_policy_and_value_per_rank(pipeline_run, tmp_path):
    _, _, out = pipeline_run
    proc = run_ftl("launch", str(ROOT / "recipes" / "rlhf" / "ppo.yaml"), "--profile", "tiny_zero3",
                   f"model.path={out / 'sft' / 'final'}", f"reward.path={out / 'reward' / 'final'}",
                   f"track.output_dir={tmp_path / 'z3'}", f"launch.main_process_port={free_port()}",
                   cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "z3" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["ppo"]["reference"] == "disabled_adapter"
    for check in manifest["rank_checks"]:  # one engine holds policy (+LoRA) and value model
        assert check["zero"]["param_numel_local"] * 2 == check["zero"]["param_numel_full"]
    assert len(read_jsonl(tmp_path / "z3" / "metrics.jsonl")) == 4
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "sft" / "final"),
                                       tmp_path / "z3" / "final")  # the gathered adapter loads on one process
    assert any(p.abs().max() > 0 for n, p in policy.named_parameters() if "lora_B" in n)


def training_pair_metrics(run_dir):
    """Pairwise accuracy / loss of run_dir's merged reward model on the pairs it trained on."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ftl.config import load_recipe
    from ftl.data import load_splits
    from ftl.evaluate.pairwise import encode_pairs, pairwise_metrics

    recipe = load_recipe(run_dir / "recipe.yaml")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    features = encode_pairs(tokenizer, load_splits(recipe.data)[0].train, recipe)
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged").eval()
    with torch.no_grad():
        return pairwise_metrics(model, features, tokenizer.pad_token_id)


@pytest.mark.parametrize("kind", ["lora", "qlora"])
def test_reward_model_trains_with_adapters(pipeline_run, tmp_path, kind):
    _, _, out = pipeline_run
    # ~90 training pairs, ~3 epochs: enough to fit them (the 36 held-out pairs of the full share are too few
    # and too hard for the tiny model to show learning reliably)
    proc = run_ftl("run", str(ROOT / "recipes" / "rlhf" / "reward.yaml"), "--profile", "tiny",
                   f"model.path={out / 'sft' / 'final'}", f"track.output_dir={tmp_path / 'rm'}",
                   f"method.kind={kind}", "data.limit=150", "train.max_steps=30", "train.lr=1e-2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((tmp_path / "rm" / "eval.json").read_text())["after"]
    assert after["pairs"] > 0 and 0 <= after["pairwise_accuracy"] <= 1
    config = json.loads((tmp_path / "rm" / "final" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in (config.get("modules_to_save") or [])
    merged = run_ftl("merge", str(tmp_path / "rm"), cwd=tmp_path, timeout=300)  # a plain reward model folder for PPO
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert "ForSequenceClassification" in (tmp_path / "rm" / "merged" / "config.json").read_text()
    # it learned: on its training pairs, an untrained head (the same run at lr 1e-9) measured loss 0.66 and
    # accuracy 0.68-0.70 (ln 2 = 0.69 is no preference); trained, loss 0.23-0.26 and accuracy 0.89-0.91
    fitted = training_pair_metrics(tmp_path / "rm")
    assert fitted["pairs"] > 50 and fitted["loss"] < 0.45 and fitted["pairwise_accuracy"] > 0.8, fitted
