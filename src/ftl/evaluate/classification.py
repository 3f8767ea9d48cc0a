"""Measuring a sequence classifier: accuracy, precision, recall, F1 (macro) and the confusion matrix (from
scikit-learn), and the text → label features both the classify stage and `ftl eval` score, so a run's own
evaluation and a later `ftl eval` of its model measure the same thing the same way."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftl.data.tokenize import EncodeReport
from ftl.errors import DataError
from ftl.evaluate.sharded import sum_over_ranks


def classification_metrics(labels: list[int], predictions: list[int], names: list[str] | None = None) -> dict:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = sorted(set(labels) | set(predictions))
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predictions, labels=classes, average="macro", zero_division=0)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "precision": float(precision), "recall": float(recall), "f1": float(f1),
        "confusion_matrix": confusion_matrix(labels, predictions, labels=classes).tolist(),
        "classes": [names[c] if names else c for c in classes],
    }


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
