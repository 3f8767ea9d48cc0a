"""Reward model: a one-output sequence classifier trained on preference pairs (Bradley-Terry loss).

Evaluation reports pairwise accuracy (chosen scored above rejected) and the mean margin on held-out
pairs. Works with full fine-tuning, LoRA and QLoRA (PEFT's SEQ_CLS task keeps the new head trainable).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ftl.config.schema import Recipe
from ftl.data.tokenize import EncodeReport, render_response
from ftl.evaluate.sharded import sum_over_ranks
from ftl.models.scoring import sequence_scores
from ftl.stages.session import RunSession


def encode_pairs(tokenizer, records: list[dict], recipe: Recipe, report: Optional[EncodeReport] = None) -> list[dict]:
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


def pairwise_loss(model, batch) -> tuple[torch.Tensor, int]:
    chosen, rejected = pair_scores(model, batch)
    return -F.logsigmoid(chosen - rejected).mean(), len(chosen)


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


def run_reward(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()
    encoding = EncodeReport()
    train = encode_pairs(tokenizer, splits.train, recipe, encoding)
    validation = encode_pairs(tokenizer, session.validation_records(splits), recipe)
    test = encode_pairs(tokenizer, session.test_records(splits), recipe)
    rows = session.training_rows(train, encoding=encoding)
    model = session.prepare_model(tokenizer, head="sequence_classification")
    pad = tokenizer.pad_token_id

    def evaluate(m, pairs: list[dict] = validation) -> dict:
        return pairwise_metrics(m, pairs, pad, recipe.eval.batch_size, session.accelerator) if pairs else {}

    model, result = session.fit(model, tokenizer, rows, lambda batch: collate_pairs(batch, pad), pairwise_loss,
                                evaluate)
    return session.finish(model, tokenizer, result,
                          lambda: {**evaluate(model), **({"test": evaluate(model, test)} if test else {})})
