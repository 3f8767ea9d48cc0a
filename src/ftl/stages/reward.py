"""Reward model: a one-output sequence classifier trained on preference pairs (Bradley-Terry loss).

Evaluation reports pairwise accuracy (chosen scored above rejected) and the mean margin on held-out
pairs (measured by ftl.evaluate.pairwise, as `ftl eval` measures a reward model). Works with full fine-tuning,
LoRA and QLoRA (PEFT's SEQ_CLS task keeps the new head trainable).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ftl.config.schema import Recipe
from ftl.data.tokenize import EncodeReport
from ftl.evaluate.pairwise import collate_pairs, encode_pairs, pair_scores, pairwise_metrics
from ftl.stages.session import RunSession


def pairwise_loss(model, batch) -> tuple[torch.Tensor, int]:
    chosen, rejected = pair_scores(model, batch)
    return -F.logsigmoid(chosen - rejected).mean(), len(chosen)


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
