"""data.format text: plain text for language modelling, `{text}` (TRL's standard language modeling)."""

from __future__ import annotations

from ftl.data.formats.fields import text_field


def convert(row: dict) -> dict:
    return {"text": text_field(row, "text")}
