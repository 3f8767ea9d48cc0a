"""Sequence packing and batch collation.

Packed rows carry restarting `position_ids` and NO attention mask: transformers then builds a
block-diagonal causal mask, so packed examples never attend to each other. It does so only without
a KV cache, so every packed forward must pass `use_cache=False` (see `model_inputs`).
"""

from __future__ import annotations

import bisect

import torch

from ftl.data.tokenize import IGNORE


def pack_sequences(features: list[dict], pack_length: int) -> list[dict]:
    """Best-fit decreasing: each example goes into the fullest pack it still fits in.

    The first label of every example is ignored: in a pack it would be predicted from the end of
    the previous example.
    """
    order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
    packs: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, pack index)
    for index in order:
        length = len(features[index]["input_ids"])
        if length > pack_length:
            raise ValueError(f"example of {length} tokens is longer than the pack length {pack_length}")
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, pack_index = free.pop(slot)
        else:
            space, pack_index = pack_length, len(packs)
            packs.append([])
        packs[pack_index].append(index)
        if space - length > 0:
            bisect.insort(free, (space - length, pack_index))
    return [_concatenate([features[i] for i in sorted(members)]) for members in packs]


def _concatenate(members: list[dict]) -> dict:
    input_ids, labels, position_ids = [], [], []
    for f in members:
        n = len(f["input_ids"])
        input_ids += f["input_ids"]
        labels += [IGNORE] + list(f["labels"][1:])
        position_ids += list(range(n))
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def collate(features: list[dict], pad_id: int) -> dict:
    """Right-pad a batch. Packed features (with position_ids) get no attention mask."""
    width = max(len(f["input_ids"]) for f in features)
    packed = "position_ids" in features[0]
    batch = {"input_ids": [], "labels": []}
    batch["position_ids" if packed else "attention_mask"] = []
    for f in features:
        pad = width - len(f["input_ids"])
        batch["input_ids"].append(list(f["input_ids"]) + [pad_id] * pad)
        batch["labels"].append(list(f["labels"]) + [IGNORE] * pad)
        if packed:  # padding forms its own short "sequence" after the real ones
            batch["position_ids"].append(list(f["position_ids"]) + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
    return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """Arguments for a causal-LM forward; packed batches must run without a KV cache."""
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    inputs["use_cache"] = False
    return inputs
