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
from ftl.evaluate.classification import classification_metrics
from ftl.evaluate.sharded import sum_over_ranks
from ftl.stages.session import RunSession


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


def label_id(value, names: list[str], where: str) -> int:
    """By name first (names from the data are its values as text); an integer is an index into
    classify.labels (0 → the first name)."""
    if str(value) in names:
        return names.index(str(value))
    if isinstance(value, int) and 0 <= value < len(names):
        return value
    raise DataError(f"{where}: label {value!r} is not one of classify.labels {names}")


def encode_texts(tokenizer, records: list[dict], names: list[str], max_length: int, split: str,
                 report: EncodeReport | None = None) -> list[dict]:
    if not records:  # a fast tokenizer fails on an empty batch
        return []
    texts = [r["text"] for r in records]
    ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    if report is not None:  # one token more shows what was cut (the special tokens stay either way)
        longer = tokenizer(texts, truncation=True, max_length=max_length + 1)["input_ids"]
        report.encoded += len(texts)
        report.truncated += sum(len(row) > max_length for row in longer)
    return [{"input_ids": row, "label": label_id(r["label"], names, f"{split} record {i}")}
            for i, (row, r) in enumerate(zip(ids, records))]


def collate_texts(features: list[dict], pad_id: int) -> dict:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}


def logits_of(model, batch) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


def cross_entropy(model, batch) -> tuple[torch.Tensor, int]:
    return F.cross_entropy(logits_of(model, batch), batch["labels"]), len(batch["labels"])


def classify_metrics(model, features: list[dict], names: list[str], pad_id: int, batch_size: int,
                     accelerator=None) -> dict:
    """One sharded pass: the summed confusion matrix and loss; metrics computed from them."""
    k = len(names)

    def measure(batch):
        logits = logits_of(model, batch)
        cells = batch["labels"] * k + logits.argmax(-1)
        confusion = torch.bincount(cells, minlength=k * k).double()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum").double().reshape(1)
        return torch.cat([confusion, loss])

    totals = sum_over_ranks(model, features, batch_size, lambda rows: collate_texts(rows, pad_id), measure,
                            k * k + 1, accelerator).cpu()
    confusion = totals[: k * k].reshape(k, k).long()
    labels = [t for t in range(k) for p in range(k) for _ in range(int(confusion[t, p]))]
    predictions = [p for t in range(k) for p in range(k) for _ in range(int(confusion[t, p]))]
    metrics = classification_metrics(labels, predictions, names)
    metrics["macro_f1"] = metrics.pop("f1")
    metrics.update(loss=totals[-1].item() / max(len(labels), 1), examples=len(labels))
    return metrics


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
