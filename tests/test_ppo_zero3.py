"""Full-policy PPO under DeepSpeed ZeRO-3 on 2 CPU ranks (gloo, real DeepSpeed), recipes/rlhf/ppo_full_zero3.yaml:
policy and value model train in one engine, the reference (a frozen copy of the initial policy) and the reward
model are partitioned in inference engines of their own. Checked: each rank holds half of every model; the first
iteration's losses equal a 1-process run's on the same rollout; the gathered final/ is a full model that loads on
one process; the critic-free rloo runs and trains on the same engines, and so does a critic shared with the
policy's trunk (ppo.critic: shared)."""

import json

import pytest

from conftest import ROOT, free_port, read_jsonl, run_ftl

RECIPE = ROOT / "recipes" / "rlhf" / "ppo_full_zero3.yaml"
# both runs see the same rollout: the same 4 prompts (2 per rank under ZeRO-3, micro_batches splits one global
# batch), greedy responses (top_k 1; log-probabilities stay those of the whole distribution), one mini-batch of
# the whole rollout per rank and one PPO epoch, so the first iteration's statistics are computed before any
# update; advantages unwhitened (whitened per rank, the policy loss would be ~0 on both sides)
SAME_ROLLOUT = ["sampling.top_k=1", "sampling.max_new_tokens=6", "ppo.ppo_epochs=1", "ppo.whiten_advantages=false",
                "ppo.kl_coef=0.05", "train.max_steps=2", "train.save_every=2", "train.lr=1e-3", "eval.max_examples=2",
                "data.limit=200", "train.seed=3"]
# reduction order (2 ranks x 2 rows vs 4 rows) and left padding of 2 vs 4 prompts move float32 results by ~1e-7
# relative (measured: value_loss 12.038398 vs 12.038395, policy_loss 1.9540474 vs 1.9540476)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def start_models(tmp_path_factory):
    """A tiny full policy (with tokenizer and chat template) and a reward model on the same vocabulary, saved
    as the plain folders a pipeline's SFT and reward stages hand on."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftl.config.schema import TinyModelConfig
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("ppo_zero3")
    texts = [f"How are you today, friend number {i}? I am fine, thank you for asking about the weather." for i in
             range(40)] + ["What is the capital of France? Paris is. Tell me a joke about robots."] * 10
    tokenizer = train_tiny_tokenizer(texts, 300)
    policy = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=300), tokenizer, seed=0)
    policy.save_pretrained(tmp / "sft")
    tokenizer.save_pretrained(tmp / "sft")
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_pretrained(tmp / "sft", num_labels=1)
    with torch.no_grad():
        reward.score.weight.mul_(50.0)  # scores of order 1 rather than 0.02
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(tmp / "reward")
    tokenizer.save_pretrained(tmp / "reward")
    return tmp


def ppo_run(start, out, *overrides, zero3: bool, timeout=240):
    command = "launch" if zero3 else "run"
    launch = [] if zero3 else ["launch.num_processes=1", "launch.config_file=null", "launch.deepspeed=null",
                               "launch.launcher=torchrun"]
    proc = run_ftl(command, str(RECIPE), "--profile", "tiny", f"model.path={start / 'sft'}",
                   f"reward.path={start / 'reward'}", f"track.output_dir={out}",
                   f"launch.main_process_port={free_port()}", *launch, *overrides, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return json.loads((out / "manifest.json").read_text()), read_jsonl(out / "metrics.jsonl")


def assert_each_rank_holds_half(manifest, models):
    partitions = manifest["ppo_partitions"]
    assert sorted(p["rank"] for p in partitions) == [0, 1]
    for rank in partitions:
        assert set(rank) - {"rank"} == set(models), rank
        for name in models:
            local, full = rank[name]["local"], rank[name]["full"]
            # ceil(numel / 2) per parameter: at most one padding element per parameter
            assert full / 2 <= local <= full / 2 + 64, (name, rank)
    return {name: (partitions[0][name]["local"], partitions[0][name]["full"]) for name in models}


def test_zero3_refuses_a_policy_whose_reference_cannot_be_built_partitioned():
    from ftl.errors import RecipeError
    from ftl.stages.ppo import PPOModels

    for kind in ("full", "lora", "dora"):  # a partitioned copy of the base; the adapter-disabled policy
        PPOModels.check_reference(kind, sharded=True)
    for kind in ("prefix", "adapter", "ia3"):
        PPOModels.check_reference(kind, sharded=False)  # one process or DDP: a copy of the initial policy
        with pytest.raises(RecipeError, match=f"method.kind {kind}: PPO under ZeRO-3 takes a full policy"):
            PPOModels.check_reference(kind, sharded=True)


@pytest.mark.slow
def test_full_policy_ppo_under_zero3_partitions_every_model_and_matches_one_process(start_models, tmp_path):
    single, single_rows = ppo_run(start_models, tmp_path / "one", *SAME_ROLLOUT, "ppo.rollout_batch=4",
                                  "ppo.mini_batch=4", zero3=False)
    manifest, rows = ppo_run(start_models, tmp_path / "z3", *SAME_ROLLOUT, "ppo.rollout_batch=2", "ppo.mini_batch=2",
                             zero3=True)
    assert single["world_size"] == 1 and single["ppo"]["reference"] == "copy"
    assert manifest["world_size"] == 2 and manifest["ppo"]["reference"] == "partitioned_copy"
    held = assert_each_rank_holds_half(manifest, ["policy", "value", "reference", "reward"])
    print("rank 0 holds (local, full):", held)
    assert held["reference"][1] == held["policy"][1] and held["reward"][1] == held["value"][1]
    for check in manifest["rank_checks"]:  # the trained engine (policy + value) as DeepSpeed reports it
        assert check["zero"]["param_numel_local"] * 2 == check["zero"]["param_numel_full"]

    first, first_single = rows[0], single_rows[0]
    assert first["episodes"] == first_single["episodes"] == 4
    # no response stopped early: both sides average the same number of tokens per rank
    assert first["response_length"] == first_single["response_length"] == 6
    print("step 1, 2 ranks ZeRO-3 vs 1 process:",
          {k: (first[k], first_single[k]) for k in ("policy_loss", "value_loss", "reward", "kl", "entropy")})
    for key in ("policy_loss", "value_loss", "reward", "kl", "entropy"):
        assert first[key] == pytest.approx(first_single[key], abs=TOLERANCE, rel=TOLERANCE), key
    assert abs(first["policy_loss"]) > 10 * TOLERANCE and first["value_loss"] > 10 * TOLERANCE  # not trivially 0
    assert abs(rows[1]["kl"]) > 1e-6  # the reference stayed where the policy started

    after = json.loads((tmp_path / "z3" / "eval.json").read_text())["after"]
    assert after["responses"] == 8 and after["kl_to_reference"] > 0  # compare_policies ran on the engines
    assert (tmp_path / "z3" / "checkpoints" / "step-0000002" / "COMPLETE").exists()
    assert_final_is_the_trained_full_policy(tmp_path / "z3" / "final", start_models / "sft", held["policy"][1])


def assert_final_is_the_trained_full_policy(final_dir, start_dir, numel):
    """final/ is a whole causal LM (gathered from the shards) that loads on one process, moved by training."""
    import torch
    from transformers import AutoModelForCausalLM

    final, start = AutoModelForCausalLM.from_pretrained(final_dir), AutoModelForCausalLM.from_pretrained(start_dir)
    assert sum(p.numel() for p in final.parameters()) == numel
    moved = [n for (n, p), q in zip(final.named_parameters(), start.parameters()) if not torch.equal(p, q)]
    assert moved and all(torch.isfinite(p).all() for p in final.parameters())


@pytest.mark.slow
def test_rloo_under_zero3_with_a_full_policy(start_models, tmp_path):
    manifest, rows = ppo_run(start_models, tmp_path / "rloo", "ppo.advantage=rloo", "ppo.samples_per_prompt=2",
                             "ppo.rollout_batch=2", "ppo.mini_batch=4", "train.max_steps=2", "train.save_every=2",
                             "sampling.max_new_tokens=6", "eval.max_examples=2", "data.limit=200", zero3=True)
    assert manifest["ppo"]["value_model"] is False and manifest["ppo"]["reference"] == "partitioned_copy"
    held = assert_each_rank_holds_half(manifest, ["policy", "reference", "reward"])
    print("rloo, rank 0 holds (local, full):", held)
    assert len(rows) == 2 and all(r["episodes"] == 8 and "value_loss" not in r for r in rows)
    # step 1's policy loss is exactly 0 (ratio 1; leave-one-out advantages of k=2 samples sum to 0 per prompt):
    # that it trained shows in the KL to the reference after one update and in the final weights
    assert abs(rows[1]["kl"]) > 1e-6
    assert_final_is_the_trained_full_policy(tmp_path / "rloo" / "final", start_models / "sft", held["policy"][1])


@pytest.mark.slow
def test_a_shared_critic_under_zero3_is_a_partitioned_head_trained_with_the_policy(start_models, tmp_path):
    """ppo.critic shared: the value head sits in the policy's engine, partitioned like the rest; step 1 matches a
    1-process run (a fresh head values everything at 0: the value loss is 0.5 x the mean squared return)."""
    shared = ["ppo.critic=shared", *SAME_ROLLOUT]
    single, single_rows = ppo_run(start_models, tmp_path / "one", *shared, "ppo.rollout_batch=4", "ppo.mini_batch=4",
                                  zero3=False)
    manifest, rows = ppo_run(start_models, tmp_path / "z3", *shared, "ppo.rollout_batch=2", "ppo.mini_batch=2",
                             zero3=True)
    assert manifest["ppo"]["critic"] == single["ppo"]["critic"] == "shared"
    held = assert_each_rank_holds_half(manifest, ["policy", "value", "reference", "reward"])
    assert held["value"][1] == 32 + 1  # hidden size + bias: no second model
    for key in ("policy_loss", "value_loss", "reward", "kl", "entropy"):
        assert rows[0][key] == pytest.approx(single_rows[0][key], abs=TOLERANCE, rel=TOLERANCE), key
    assert rows[0]["value_loss"] > 10 * TOLERANCE and rows[1]["value_loss"] != rows[0]["value_loss"]
    assert_final_is_the_trained_full_policy(tmp_path / "z3" / "final", start_models / "sft", held["policy"][1])
