"""Measuring a reward model on preference pairs: pairwise accuracy (chosen scored above rejected), mean
margin and the Bradley-Terry loss. The reward stage's own evaluation and `ftl eval` of a reward model both
encode and score pairs here, so the two report the same numbers for the same pairs."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ftl.data.tokenize import EncodeReport, render_response
from ftl.evaluate.sharded import sum_over_ranks
from ftl.models.scoring import sequence_scores


def encode_pairs(tokenizer, records: list[dict], recipe, report: Optional[EncodeReport] = None) -> list[dict]:
    """Chosen and rejected conversations as token ids, each cut at data.max_length (counted in `report`)."""
    out, limit = [], recipe.data.max_length
    for r in records:
        chosen = render_response(tokenizer, r, "chosen", recipe.data.system_prompt)
        rejected = render_response(tokenizer, r, "rejected", recipe.data.system_prompt)
        ids = tokenizer([chosen, rejected], add_special_tokens=False)["input_ids"]
        out.append({"chosen_input_ids": ids[0][:limit], "rejected_input_ids": ids[1][:limit]})
        if report is not None:
            report.encoded += 1
            report.truncated += max(len(ids[0]), len(ids[1])) > limit
    return out


def collate_pairs(features: list[dict], pad_id: int) -> dict:
    """Chosen rows first, then rejected rows, right-padded into one batch."""
    rows = [f["chosen_input_ids"] for f in features] + [f["rejected_input_ids"] for f in features]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def pair_scores(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"])
    half = len(scores) // 2
    return scores[:half], scores[half:]


def pairwise_metrics(model, features: list[dict], pad_id: int, batch_size: int = 8, accelerator=None) -> dict:
    def measure(batch):  # correct pairs, margin sum, loss sum, pairs
        chosen, rejected = pair_scores(model, batch)
        margin = (chosen - rejected).double()
        return torch.stack([(margin > 0).double().sum(), margin.sum(), -F.logsigmoid(margin).sum(),
                            torch.tensor(float(len(margin)), dtype=torch.float64, device=margin.device)])

    totals = sum_over_ranks(model, features, batch_size, lambda rows: collate_pairs(rows, pad_id), measure, 4,
                            accelerator)
    pairs = max(totals[3].item(), 1.0)
    return {"pairwise_accuracy": totals[0].item() / pairs, "mean_margin": totals[1].item() / pairs,
            "loss": totals[2].item() / pairs, "pairs": int(totals[3].item())}
