"""The chunked causal-LM loss (train.loss_chunk_tokens, ftl.models.chunked_loss) equals the plain one: losses,
log-probabilities, entropies, KL and every gradient, for each method, tied and untied heads, packed and
unpacked rows, on 1 rank, on 2 DDP ranks and on 2 DeepSpeed ZeRO-3 ranks; the head never sees more than one
chunk; models whose forward changes the logits are refused."""

import json

import pytest
import torch

from conftest import run_ftl, tiny_recipe_dict, torchrun_two_ranks, train_losses, write_recipe
from ftl.config.schema import MethodConfig, ModelConfig, QuantOptions, TrainConfig
from ftl.evaluate.lm import causal_lm_loss, lm_loss
from ftl.methods import METHODS, apply_method
from ftl.models.chunked_loss import DEFAULT_CHUNK_TOKENS, ChunkedHeadUnsupported, causal_lm_of
from ftl.models.load import load_model
from ftl.rl.compare import response_kl
from ftl.rl.reference import Reference
from ftl.rl.rollout import Responses, response_logprobs

CHUNK = 7  # several chunks per batch, the last one partial
ATOL = 1e-5
VOCAB = 300


def tiny_base(tmp_path, tied: bool):
    """A saved tiny Llama (hidden 64: bitsandbytes' CPU path needs it), tied or untied head."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path / f"base_tied{tied}"
    if not folder.exists():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tied)
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def method_model(tmp_path, kind: str, tied: bool, **options):
    """The tiny base with a method applied as ftl applies it (fp32; QLoRA: 4-bit base, fp32 compute), and its
    trainable zero-initialised parts (LoRA B, bottleneck up-projections) made non-zero so every gradient is."""
    folder = tiny_base(tmp_path, tied)
    cfg = ModelConfig(source="path", path=str(folder))
    model = load_model(cfg, folder, METHODS[kind].quant_bits, QuantOptions(compute_dtype="float32"))
    if METHODS[kind].quant_bits == 4:  # a real 4-bit base; bitsandbytes leaves the output head unquantised
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        assert type(model.get_output_embeddings()) is torch.nn.Linear
    torch.manual_seed(0)  # methods that initialise randomly (LLaMA-Adapter's prompts) start alike in every test
    model = apply_method(model, MethodConfig(kind=kind, **options))
    generator = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_B" in name or ".up." in name):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model.train()


def sft_batch(packed: bool) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 20), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    batch = {"input_ids": ids, "labels": labels}
    if packed:  # two examples per row, each first label ignored (ftl.data.packing)
        batch["position_ids"] = torch.tensor([list(range(8)) + list(range(12))] * 3)
        batch["labels"][:, 8] = -100
    else:  # right padding on one row
        batch["attention_mask"] = torch.ones_like(ids)
        batch["attention_mask"][1, 15:] = 0
        batch["labels"][1, 15:] = -100
    return batch


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss, outputs = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return outputs, grads


def assert_same(plain, chunked):
    (plain_out, plain_grads), (chunked_out, chunked_grads) = plain, chunked
    assert plain_grads and plain_grads.keys() == chunked_grads.keys()
    for key in plain_out:
        torch.testing.assert_close(chunked_out[key], plain_out[key], atol=ATOL, rtol=0)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, atol=ATOL, rtol=0, msg=name)
    assert max(g.abs().max().item() for g in plain_grads.values()) > 1e-4  # gradients that mean something


CASES = [  # (method, options, tied, packed)
    ("full", {}, False, False), ("full", {}, False, True), ("full", {}, True, False), ("full", {}, True, True),
    ("lora", {}, True, True), ("lora", {"lora": {"target_modules": ["q_proj", "v_proj", "lm_head"]}}, False, False),
    ("qlora", {}, True, False), ("qlora", {}, False, True),
    ("dora", {}, False, True), ("ia3", {}, True, True), ("adapter", {}, False, True),
    ("prompt", {"prompt": {"num_virtual_tokens": 4}}, True, False),
    ("ptuning", {"prompt": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}}, False, False),
    ("prefix", {"prompt": {"num_virtual_tokens": 4}}, False, False),
    ("llama_adapter", {}, True, False),
]


@pytest.mark.parametrize("kind,options,tied,packed", CASES,
                         ids=[f"{k}{'-head' if o.get('lora') else ''}-{'tied' if t else 'untied'}-"
                              f"{'packed' if p else 'unpacked'}" for k, o, t, p in CASES])
def test_loss_and_gradients_equal_the_plain_computation(tmp_path, kind, options, tied, packed):
    model = method_model(tmp_path, kind, tied, **options)
    assert (causal_lm_of(model).get_output_embeddings().weight is
            causal_lm_of(model).get_input_embeddings().weight) == tied or "lm_head" in str(options)
    batch = sft_batch(packed)

    def run(chunk):
        loss, count = causal_lm_loss(model, batch, chunk)
        return loss, {"loss": loss.detach(), "count": torch.tensor(count)}

    assert_same(loss_and_grads(model, lambda: run(0)), loss_and_grads(model, lambda: run(CHUNK)))
    with torch.no_grad():  # evaluation: token-weighted loss over examples, batched
        features = [{"input_ids": r.tolist(), "labels": l.tolist()} for r, l in zip(batch["input_ids"], batch["labels"])]
        plain, chunked = lm_loss(model.eval(), features, 0, 2, chunk_tokens=0), lm_loss(model, features, 0, 2,
                                                                                         chunk_tokens=CHUNK)
    assert chunked["tokens"] == plain["tokens"] and chunked["loss"] == pytest.approx(plain["loss"], abs=ATOL)


def rollout_like(seed=2):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, VOCAB, (3, 16), generator=g)
    mask = torch.ones_like(seq)
    mask[0, :3] = 0  # left-padded prompt
    mask[2, 13:] = 0  # after EOS
    return seq, mask, (mask.cumsum(-1) - 1).clamp(min=0), torch.randn(3, 10, generator=g)


@pytest.mark.parametrize("kind,tied", [("full", False), ("lora", True)])
def test_ppo_logprobs_and_entropy_equal_the_plain_ones(tmp_path, kind, tied):
    model = method_model(tmp_path, kind, tied)
    seq, mask, pos, advantages = rollout_like()

    def run(chunk):
        logprobs, entropy = response_logprobs(model, seq, mask, pos, 6, 0.7, with_entropy=True, chunk_tokens=chunk)
        return (logprobs * advantages).mean() - 0.01 * entropy.mean(), {"logprobs": logprobs.detach(),
                                                                         "entropy": entropy.detach()}

    assert_same(loss_and_grads(model, lambda: run(0)), loss_and_grads(model, lambda: run(CHUNK)))
    with torch.no_grad():
        torch.testing.assert_close(response_logprobs(model, seq, mask, pos, 6, 1.3, chunk_tokens=CHUNK),
                                   response_logprobs(model, seq, mask, pos, 6, 1.3, chunk_tokens=0), atol=ATOL, rtol=0)


def test_kl_to_a_disabled_adapter_reference_equals_the_plain_one(tmp_path):
    """PPO's comparison: KL over full distributions. A LoRA adapter on lm_head too, so the reference's head
    differs from the policy's only while the adapter is off."""
    model = method_model(tmp_path, "lora", False, lora={"target_modules": ["q_proj", "lm_head"]}).eval()
    reference = Reference.__new__(Reference)
    reference.unwrapped, reference.frozen, reference.kind, reference.shares_weights = model, None, "disabled_adapter", True
    seq, mask, pos, _ = rollout_like()
    r = Responses(seq, mask, pos, 6, mask[:, 6:].float(), [""] * 3, torch.ones(3, dtype=torch.bool))
    with torch.no_grad():
        plain, chunked = response_kl(model, reference, r, 0), response_kl(model, reference, r, CHUNK)
    assert plain.shape == (3, 10) and plain.min() > 1e-4  # the adapter really changes the distributions
    torch.testing.assert_close(chunked, plain, atol=ATOL, rtol=0)


def test_the_head_sees_one_chunk_of_counted_positions_at_a_time(tmp_path):
    assert TrainConfig().loss_chunk_tokens == DEFAULT_CHUNK_TOKENS  # on by default, the same default everywhere
    model = method_model(tmp_path, "full", True)
    rows = []
    hook = causal_lm_of(model).get_output_embeddings().register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape))
    batch = sft_batch(packed=False)
    loss, count = causal_lm_loss(model, batch, CHUNK)
    forward_rows = list(rows)
    loss.backward()
    hook.remove()
    assert all(len(shape) == 2 and shape[0] <= CHUNK for shape in rows), rows  # [tokens, hidden], one chunk
    assert sum(shape[0] for shape in forward_rows) == count  # only positions whose label counts
    assert len(forward_rows) > 1 and len(rows) == 2 * len(forward_rows) - 1  # backward recomputed every chunk but the last


def test_a_model_that_changes_its_logits_after_the_head_is_refused_and_computes_plainly():
    from transformers import AutoModelForCausalLM, CohereConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CohereConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, logit_scale=0.0625))
    batch = sft_batch(packed=False)
    with pytest.raises(ChunkedHeadUnsupported, match="loss_chunk_tokens: 0"):
        causal_lm_loss(model, batch, CHUNK)
    loss, count = causal_lm_loss(model, batch, 0)
    assert torch.isfinite(loss) and count > 0


@pytest.mark.slow
def test_two_ranks_ddp_and_zero3_equal_the_plain_computation(tmp_path):
    """One torchrun launch (2 gloo ranks) runs every case: DDP (full, tied/untied, packed/unpacked, a rank
    counting no token, LoRA on lm_head, PPO log-probs) and ZeRO-3 (full tied/untied, LoRA, PPO log-probs,
    a no-grad evaluation), each rank with a different number of chunks."""
    out = tmp_path / "ranks.json"
    report = torchrun_two_ranks("chunked_loss_ranks.py", out, timeout=600)
    assert report.pop("world_size") == 2
    assert len(report) == 9 and sum(name.startswith("zero3") for name in report) == 5
    for name, diffs in report.items():
        for key, value in diffs.items():
            if key not in ("grad_scale", "params_with_grad"):
                assert value <= ATOL, (name, key, value)
        assert "grad" not in diffs or diffs["grad_scale"] > 1e-4, (name, diffs)


def test_the_recipe_key_switches_the_loss_and_the_curves_agree(tmp_path):
    """train.loss_chunk_tokens reaches the SFT loss and its evaluation: 0 (plain) and 16 give the same run."""
    runs = {}
    for chunk in (0, 16):
        recipe = tiny_recipe_dict(tmp_path / f"run{chunk}", train={"max_steps": 4, "save_every": None,
                                                                   "optimizer": "sgd", "loss_chunk_tokens": chunk},
                                  eval={"max_examples": 8, "generate": {"from_validation": 0}})
        proc = run_ftl("run", str(write_recipe(tmp_path / f"r{chunk}.yaml", recipe)), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[chunk] = (train_losses(tmp_path / f"run{chunk}"),
                       json.loads((tmp_path / f"run{chunk}" / "eval.json").read_text())["after"]["loss"])
    (plain, plain_eval), (chunked, chunked_eval) = runs[0], runs[16]
    assert len(plain) == 4 and max(abs(a - b) for a, b in zip(plain, chunked)) < ATOL, (plain, chunked)
    assert chunked_eval == pytest.approx(plain_eval, abs=ATOL)
