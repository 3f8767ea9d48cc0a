"""PPO takes the rollout's old log-probabilities from generate's logits instead of a second policy forward
(ftl.rl.rollout.reuses_generation): they must equal that forward's — full and LoRA policies, temperatures other
than 1, top-k sampling (generate's logits are the raw ones, before temperature and top-k), left-padded prompts
of different lengths, responses that stop at EOS, the plain and the chunked log-probability path — and the
configurations where they would not are refused."""

import json
import math

import pytest
import torch

from ftl.config.schema import MethodConfig, SamplingConfig, TinyModelConfig
from ftl.methods import apply_method
from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer
from ftl.rl import maths
from ftl.rl.reference import Reference
from ftl.rl.reward import RewardFunction
from ftl.rl.rollout import (collect, response_logprobs, response_values, reuses_generation, sample_responses,
                             trimmed)

ATOL = 2e-5
CHUNK = 7  # several chunks per batch on the chunked path
PROMPTS = ["hello there", "what is your name and where do you live", "tell me a joke", "hi",
           "how are you today my friend", "why"]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [p + " " + q for p in PROMPTS for q in PROMPTS] * 3
    tok = train_tiny_tokenizer(texts, vocab_size=300)
    tok.padding_side = "left"
    return tok


def policy(tokenizer, kind: str):
    """The tiny Llama with an EOS-favouring bias on its head (so some responses stop early and are masked after
    EOS), full or with a LoRA adapter whose B matrices are non-zero (so the adapter changes the logits)."""
    model = build_tiny_model(TinyModelConfig(vocab_size=300), tokenizer, seed=0)
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[tokenizer.eos_token_id] = 4.0
    model.set_output_embeddings(biased)
    model.config.tie_word_embeddings = False
    if kind == "lora":
        model = apply_method(model, MethodConfig(kind="lora", lora={"target_modules": "all-linear"}))
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.mark.parametrize("kind", ["full", "lora"])
@pytest.mark.parametrize("temperature,top_k", [(0.7, 0), (1.6, 5)])
def test_logprobs_from_generation_equal_a_separate_forward(tokenizer, kind, temperature, top_k):
    model = policy(tokenizer, kind)
    sampling = SamplingConfig(max_new_tokens=12, temperature=temperature, top_k=top_k)
    assert reuses_generation(model, len(PROMPTS), sampling, 0) is None
    torch.manual_seed(0)
    r = sample_responses(model, tokenizer, PROMPTS, sampling, "cpu", with_logprobs=True)
    assert (r.attention_mask[:, :r.prompt_length] == 0).any(), "prompts of different lengths: left padding"
    assert r.has_eos.any() and (r.mask == 0).any(), "some responses stop at EOS and are masked after it"
    assert r.logprobs.shape == r.mask.shape
    with torch.no_grad():
        for chunk in (0, CHUNK):
            separate = response_logprobs(model, r.sequences, r.attention_mask, r.position_ids, r.prompt_length,
                                         temperature, chunk_tokens=chunk)
            real = r.mask.bool()
            torch.testing.assert_close(r.logprobs[real], separate[real], atol=ATOL, rtol=0)
            # the temperature is applied (at temperature 1 the numbers would differ clearly)
            at_one = response_logprobs(model, r.sequences, r.attention_mask, r.position_ids, r.prompt_length,
                                       1.0, chunk_tokens=chunk)
            assert (r.logprobs[real] - at_one[real]).abs().max() > 1e-2


def test_collect_reuses_generation_and_matches_the_separate_forward(tokenizer):
    """The PPO rollout, once with the log-probabilities from generation and once (a loss chunk smaller than the
    generated logits) from the separate forward: the same sampled sequences, the same numbers."""
    model = policy(tokenizer, "lora")
    reference = Reference.__new__(Reference)
    reference.unwrapped, reference.frozen, reference.kind, reference.shares_weights = model, None, \
        "disabled_adapter", True
    reward = RewardFunction()
    reward.function = lambda texts: [float(len(t)) for t in texts]
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.8)

    def run(chunk_tokens):
        torch.manual_seed(5)
        return collect(model, reference, None, reward, tokenizer, PROMPTS, sampling, "cpu", chunk_tokens)

    reused, separate = run(0), run(len(PROMPTS) * 10 - 1)
    assert reused.logprobs_from_generation and not separate.logprobs_from_generation
    assert torch.equal(reused.sequences, separate.sequences)
    real = reused.mask.bool()
    torch.testing.assert_close(reused.logprobs[real], separate.logprobs[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(reused.ref_logprobs, separate.ref_logprobs)
    assert not torch.allclose(reused.logprobs[real], reused.ref_logprobs[real], atol=1e-3)  # the adapter acts


def test_configurations_that_keep_the_separate_forward(tokenizer):
    sampling = SamplingConfig(max_new_tokens=16)
    model = policy(tokenizer, "full")
    assert reuses_generation(model, 8, sampling, 1024) is None
    assert reuses_generation(model, 8, sampling, 0) is None  # plain path: its forward holds all logits anyway
    assert "loss chunk" in reuses_generation(model, 128, sampling, 1024)
    assert "not fp32" in reuses_generation(model.to(torch.bfloat16), 8, sampling, 1024)
    wrapped = policy(tokenizer, "full")
    wrapped._original_forward = wrapped.forward  # what accelerate leaves when it wraps forward in autocast
    assert "mixed precision" in reuses_generation(wrapped, 8, sampling, 1024)
    base = build_tiny_model(TinyModelConfig(vocab_size=300), tokenizer, seed=0)
    prompt_tuned = apply_method(base, MethodConfig(kind="prompt"))
    assert "prompt-learning" in reuses_generation(prompt_tuned, 8, sampling, 1024)


def test_policy_loss_ignores_masked_log_ratios():
    """After EOS the generated log-probabilities differ from a forward's: the masked ratio must not overflow."""
    new = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-0.4, -float("inf"), -300.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0]])
    loss, clip = maths.policy_loss(new, old, torch.tensor([[1.0, 0.0, 0.0]]), mask, 0.2)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-torch.exp(torch.tensor(-0.1)).item())
    assert clip.item() == 0.0 and new.grad[0, 1:].eq(0).all() and new.grad[0, 0] != 0


def test_mini_batches_run_on_the_columns_they_use(tokenizer):
    """ppo_step drops the left padding all of a mini-batch's rows share and the columns after every row's end
    (ftl.rl.rollout.trimmed): each real token's log-probability and value stay those of the whole batch."""
    from transformers import AutoModelForSequenceClassification

    model = policy(tokenizer, "full")
    torch.manual_seed(1)
    value_model = AutoModelForSequenceClassification.from_config(model.config.__class__(
        **{**model.config.to_dict(), "num_labels": 1})).eval()
    torch.manual_seed(0)
    r = sample_responses(model, tokenizer, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=0.9), "cpu")
    rows = torch.tensor([0, 3, 5])  # short prompts: the long ones' padding columns go
    seq, mask, pos = r.sequences[rows], r.attention_mask[rows], r.position_ids[rows]
    t_seq, t_mask, t_pos, t_prompt, width = trimmed(seq, mask, pos, r.prompt_length)
    assert t_seq.shape[1] < seq.shape[1] and t_prompt < r.prompt_length
    assert width == int(r.mask[rows].sum(-1).max())
    real = r.mask[rows, :width].bool()
    with torch.no_grad():
        for chunk in (0, CHUNK):
            whole = response_logprobs(model, seq, mask, pos, r.prompt_length, 0.9, chunk_tokens=chunk)[:, :width]
            part = response_logprobs(model, t_seq, t_mask, t_pos, t_prompt, 0.9, chunk_tokens=chunk)
            torch.testing.assert_close(part[real], whole[real], atol=ATOL, rtol=0)
        whole = response_values(value_model, seq, mask, pos, r.prompt_length)[:, :width]
        part = response_values(value_model, t_seq, t_mask, t_pos, t_prompt)
        torch.testing.assert_close(part[real], whole[real], atol=ATOL, rtol=0)


def test_a_bf16_lora_ppo_run_rolls_out_in_bf16_over_a_bf16_frozen_base(tiny_recipe, tmp_path, monkeypatch,
                                                                       fresh_accelerate_state):
    """train.precision bf16 (no DeepSpeed), LoRA policy: every rollout runs under the run's autocast (a PEFT
    model's generate bypasses the autocast accelerate wraps its forward in; before, LoRA sampled in fp32) and
    the frozen base linears are stored in bf16 (exact under autocast); the adapter trains in fp32."""
    import ftl.stages.ppo as ppo
    from conftest import tiny_ppo_recipe
    from ftl.config import load_recipe

    seen = []
    real_collect = ppo.collect

    def observed(policy, *args, **kwargs):
        linears = [m for n, m in policy.named_modules() if n.endswith("mlp.down_proj.base_layer")]
        seen.append({"autocast": torch.is_autocast_enabled("cpu"), "base": linears[0].weight.dtype,
                     "adapter": {p.dtype for n, p in policy.named_parameters() if "lora_" in n}})
        rollout = real_collect(policy, *args, **kwargs)
        seen[-1]["logprobs_from_generation"] = rollout.logprobs_from_generation
        return rollout

    monkeypatch.setattr(ppo, "collect", observed)
    path = tiny_ppo_recipe(tiny_recipe, "bf16_lora", "gae", 1)
    recipe = load_recipe(path, overrides=["method={kind: lora, lora: {r: 4, alpha: 8, target_modules: all-linear}}",
                                          "train.precision=bf16", "train.max_steps=2", "train.save_every=2",
                                          "eval.max_examples=2"])
    ppo.run_ppo(recipe, tmp_path / "run")
    assert len(seen) == 2
    assert all(s["autocast"] and s["base"] == torch.bfloat16 and s["adapter"] == {torch.float32} for s in seen)
    assert not any(s["logprobs_from_generation"] for s in seen)  # under autocast: the separate forward
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "policy_loss" in r] == [1, 2]
    assert all(math.isfinite(r["policy_loss"]) and math.isfinite(r["value_loss"]) for r in rows if "policy_loss" in r)
