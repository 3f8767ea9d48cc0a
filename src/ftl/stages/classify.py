"""Sequence classification: a pretrained encoder (MiniLM) or decoder (SmolLM2, the tiny Llama) with a new
`num_labels`-way head, trained with cross-entropy — the head alone or under any method.

Evaluation (validation during training, test at the end when the recipe keeps a test split) reports
accuracy, macro precision/recall/F1 and the confusion matrix from the shared evaluation layer.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from ftl import run_dir as layout
from ftl.config.schema import Recipe
from ftl.data.splits import Splits
from ftl.data.tokenize import EncodeReport
from ftl.errors import DataError, RecipeError
from ftl.evaluate.classification import classify_metrics, collate_texts, encode_texts, logits_of
from ftl.stages.session import RunSession, longest


def label_names(recipe: Recipe, splits: Splits) -> list[str]:
    """Names in id order: classify.labels, else the labels training holds, sorted (integers by value), so
    no class exists that nothing trains. A label only validation or test holds is refused by name."""
    if recipe.classify.labels:
        return list(recipe.classify.labels)
    seen = {r["label"] for r in splits.train}
    numbers, words = sorted(v for v in seen if isinstance(v, int)), sorted(v for v in seen if isinstance(v, str))
    names = list(dict.fromkeys(str(v) for v in numbers + words))  # 7 and "7" are one class
    if len(names) < 2:
        raise DataError(f"data: the training split holds only label {names}: a classifier needs at least two")
    for split in ("validation", "test"):
        unseen = Counter(str(r["label"]) for r in getattr(splits, split) if str(r["label"]) not in names)
        if unseen:
            listed = ", ".join(f"{label!r} ({count} rows)" for label, count in unseen.most_common())
            raise DataError(f"data: the {split} split holds labels the training split never has: {listed} "
                            f"(training has {names}); fix the data, or name every class in classify.labels")
    return names


def cross_entropy(model, batch) -> tuple[torch.Tensor, int]:
    return F.cross_entropy(logits_of(model, batch), batch["labels"]), len(batch["labels"])


HEAD_NAMES = ("score", "classifier")  # transformers' sequence-classification heads (decoders, encoders)


def freeze_all_but_head(model, recipe: Recipe) -> None:
    """The pretrained model frozen, only the new head trains (the classic linear probe): everything
    beside the head goes into train.freeze.modules, so the manifest records it like any freeze."""
    if recipe.method.kind != "full":
        raise RecipeError(f"classify.train_head_only freezes the whole pretrained model: it goes with "
                          f"method.kind 'full', not '{recipe.method.kind}' (adapter methods already train the head)")
    children = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    if not any(name in HEAD_NAMES for name in children):
        raise RecipeError(f"classify.train_head_only: {type(model).__name__} has no head named {HEAD_NAMES}")
    body = [name for name in children if name not in HEAD_NAMES]
    recipe.train.freeze = recipe.train.freeze.model_copy(update={"modules": recipe.train.freeze.modules + body})


def run_classify(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()
    names = label_names(recipe, splits)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoding, length = EncodeReport(), recipe.data.max_length
    train = encode_texts(tokenizer, splits.train, names, length, "train", encoding)
    validation = encode_texts(tokenizer, session.validation_records(splits), names, length, "validation")
    test = encode_texts(tokenizer, splits.test[: recipe.eval.max_examples], names, length, "test")
    rows = session.training_rows(train, encoding=encoding)
    session.note_lengths(eval=longest(validation + test))  # what evaluation's batches are planned at
    session.note_data(labels=names)
    if session.main:
        (run_dir / layout.LABELS_FILE).write_text(json.dumps(names, ensure_ascii=False))
    model = prepare_classifier(session, tokenizer, names)
    pad = tokenizer.pad_token_id

    def evaluate(m, features=validation) -> dict:
        return classify_metrics(m, features, names, pad, recipe.eval.batch_size, session.accelerator) \
            if features else {}

    def evaluate_at_end() -> dict:
        return {**evaluate(model), **({"test": evaluate(model, test)} if test else {})}

    model, result = session.fit(model, tokenizer, rows, lambda batch: collate_texts(batch, pad), cross_entropy,
                                evaluate)
    return session.finish(model, tokenizer, result, evaluate_at_end)


def prepare_classifier(session: RunSession, tokenizer, names: list[str]):
    """The base with a new len(names)-way head named by the labels, frozen but for the head when asked,
    then the method applied."""
    base = session.load_base(tokenizer, head="sequence_classification", num_labels=len(names))
    base.config.id2label = dict(enumerate(names))
    base.config.label2id = {n: i for i, n in enumerate(names)}
    if session.recipe.classify.train_head_only:
        freeze_all_but_head(base, session.recipe)
    return session.apply_method(base, task_type="SEQ_CLS")
