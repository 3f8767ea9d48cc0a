"""Packing: every example once, within the pack length, and no attention across packed examples."""

import random

import pytest
import torch

from conftest import tiny_recipe_dict, write_recipe
from ftl.config import load_recipe
from ftl.config.schema import TinyModelConfig
from ftl.data.packing import collate, pack_sequences
from ftl.data.tokenize import IGNORE
from ftl.errors import RecipeError
from ftl.evaluate.lm import token_losses
from ftl.models.attention import check_attention
from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer


def random_features(n, low, high, seed=0):
    rng = random.Random(seed)
    feats = []
    for _ in range(n):
        length = rng.randint(low, high)
        ids = [rng.randint(3, 299) for _ in range(length)]
        labels = [IGNORE] * (length // 3) + ids[length // 3:]
        feats.append({"input_ids": ids, "labels": labels})
    return feats


def test_best_fit_packing_keeps_every_example_once_and_fills_packs():
    feats = random_features(300, 5, 120)
    packs = pack_sequences(feats, 128)
    assert all(len(p["input_ids"]) <= 128 for p in packs)
    assert sum(len(p["input_ids"]) for p in packs) == sum(len(f["input_ids"]) for f in feats)
    starts = sum(p["position_ids"].count(0) for p in packs)
    assert starts == len(feats)
    fill = sum(len(p["input_ids"]) for p in packs) / (128 * len(packs))
    assert fill > 0.9, f"best-fit decreasing should fill packs, got {fill:.2f}"
    with pytest.raises(ValueError, match="longer than the pack length"):
        pack_sequences(random_features(1, 200, 200), 128)


def tiny_model(seed=0):
    tokenizer = train_tiny_tokenizer([f"word{i} " * 3 for i in range(200)], 300)
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, vocab_size=300),
                             tokenizer, seed)
    return model.eval(), tokenizer


def per_example_losses_unpacked(model, feats, pad_id):
    out = []
    for f in feats:
        losses, mask = token_losses(model, collate([f], pad_id))
        out.append(losses[mask])
    return out


def per_example_losses_packed(model, packs, pad_id):
    """Split each pack's per-token losses back into its examples (by restarting position ids)."""
    out = []
    batch = collate(packs, pad_id)
    losses, mask = token_losses(model, batch)
    for row, pack in enumerate(packs):
        starts = [i for i, p in enumerate(pack["position_ids"]) if p == 0] + [len(pack["position_ids"])]
        for a, b in zip(starts, starts[1:]):
            # position t predicts label t+1: an example's losses sit at [a, b-1)
            out.append(losses[row, a:b - 1][mask[row, a:b - 1]])
    return out


@torch.no_grad()
def test_each_examples_per_token_loss_is_the_same_packed_and_unpacked():
    model, tokenizer = tiny_model()
    feats = random_features(12, 4, 40, seed=1)
    packs = pack_sequences(feats, 64)
    assert len(packs) < len(feats)  # really packed
    unpacked = per_example_losses_unpacked(model, feats, tokenizer.pad_token_id)
    packed = per_example_losses_packed(model, packs, tokenizer.pad_token_id)
    key = lambda t: (len(t), round(float(t.sum()), 3))  # noqa: E731 - match examples across orders
    unpacked_sorted, packed_sorted = sorted(unpacked, key=key), sorted(packed, key=key)
    assert [len(t) for t in unpacked_sorted] == [len(t) for t in packed_sorted]
    for u, p in zip(unpacked_sorted, packed_sorted):
        torch.testing.assert_close(p, u, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_packed_forward_with_a_kv_cache_would_leak_across_examples():
    """The trap this layer guards against: with use_cache the block-diagonal mask is not built."""
    model, tokenizer = tiny_model()
    packs = pack_sequences(random_features(6, 10, 30, seed=2), 128)
    batch = collate(packs[:1], tokenizer.pad_token_id)
    safe = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    assert (safe - leaky).abs().max() > 1e-3


def test_flash_attention_2_is_refused_where_it_would_join_packed_examples(tmp_path):
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    # the premise, in transformers itself: flash_attention_2 finds packed examples in a one-row batch only
    batch = collate(pack_sequences(random_features(8, 10, 30, seed=2), 64), 0)["position_ids"]
    fullest = max(range(len(batch)), key=lambda row: int((batch[row] == 0).sum()))
    assert len(batch) > 1 and (batch[fullest] == 0).sum() > 1
    assert _is_packed_sequence(batch[fullest:fullest + 1], 1)
    assert not _is_packed_sequence(batch, len(batch))  # several rows: each read as one sequence

    def recipe(**sections):
        return load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", **sections)))

    fa2, cuda = {"attn_implementation": "flash_attention_2"}, {"device": "cuda"}
    with pytest.raises(RecipeError, match=r"model\.attn_implementation 'flash_attention_2' keeps packed examples "
                                          r"apart only at train\.batch_size 1.*train\.batch_size 4"):
        check_attention(recipe(model=fa2, launch=cuda))
    for allowed in ({"train": {"batch_size": 1}}, {"data": {"packing": False}},
                    {"method": {"kind": "prefix"}}):  # prefix tuning never packs (virtual tokens lead each row)
        check_attention(recipe(model=fa2, launch=cuda, **allowed))
    for attn in ("sdpa", "eager"):  # a block-diagonal mask from position_ids at any batch size
        check_attention(recipe(model={"attn_implementation": attn}, launch=cuda))
    with pytest.raises(RecipeError, match=r"model\.attn_implementation 'flash_attention_2' runs on CUDA only"):
        check_attention(recipe(model=fa2, train={"batch_size": 1}))
