"""data.format classification: `{text, label}`, the label an integer or a string."""

from __future__ import annotations

from ftl.data.formats.fields import text_field


def convert(row: dict) -> dict:
    record = {"text": text_field(row, "text")}
    if "label" not in row or row["label"] is None:
        raise ValueError("missing field 'label'")
    label = row["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)):
        raise ValueError(f"field 'label' must be an integer or a string, got {type(label).__name__}")
    record["label"] = label
    return record
