"""Record formats and row validation.

Every source yields `(location, row)` pairs; `validate_rows` turns them into records of one
format, raising `DataError` naming the location of a bad row, or skipping and counting it by reason.
A line a reader could not decode arrives as an `Unreadable` row and is counted like any other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from ftl.errors import DataError

ROLES = ("system", "user", "assistant")

# format → required string fields (chat and classification are checked by their own rules)
REQUIRED_TEXT_FIELDS = {
    "text": ("text",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
    "classification": ("text",),
}


class Unreadable(ValueError):
    """A line a reader could not turn into a row (not UTF-8, not JSON); `reason` is what skipped rows are
    counted by, the message adds where exactly (column, byte)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason} ({detail})")
        self.reason = reason


@dataclass
class RowReport:
    read: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "skipped": dict(self.skipped),
                "first_skipped": self.first_skipped}

    def rejections(self) -> str:
        """Why rows were skipped, for an error: the counts by reason and the first offending lines."""
        reasons = ", ".join(f"{reason} ({count} row{'s' if count > 1 else ''})"
                            for reason, count in self.skipped.most_common())
        return f"skipped: {reasons}; first: " + "; ".join(self.first_skipped[:3])


def check_row(row: Any, fmt: str) -> dict:
    """Return the record in canonical form, or raise ValueError saying what is wrong."""
    if isinstance(row, Unreadable):
        raise row
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with fields, got {type(row).__name__}")
    if fmt == "chat":
        return {"messages": _check_messages(row.get("messages"))}
    record = {}
    for name in REQUIRED_TEXT_FIELDS[fmt]:
        record[name] = _check_text(row, name)
    if fmt == "classification":
        if "label" not in row or row["label"] is None:
            raise ValueError("missing field 'label'")
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise ValueError(f"field 'label' must be an integer or a string, got {type(label).__name__}")
        record["label"] = label
    return record


def _check_text(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise ValueError(f"missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{name}' is empty")
    return value


def _check_messages(messages: Any) -> list[dict]:
    if messages is None:
        raise ValueError("missing field 'messages'")
    if not isinstance(messages, list) or not messages:
        raise ValueError("field 'messages' must be a non-empty list of {role, content}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {ROLES}, got {role!r}")
        content = msg.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(f"messages[{i}].content must be a non-empty string")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError("messages has no assistant turn to learn from")
    return out


def validate_rows(rows: Iterable[tuple[str, Any]], fmt: str, on_bad_row: str,
                  report: RowReport) -> Iterator[dict]:
    for location, row in rows:
        report.read += 1
        try:
            record = check_row(row, fmt)
        except ValueError as err:
            if on_bad_row == "error":
                raise DataError(f"{location}: {err} (format '{fmt}'; set data.on_bad_row: skip "
                                "to skip and count bad rows)") from None
            report.skipped[getattr(err, "reason", str(err))] += 1
            if len(report.first_skipped) < 5:
                report.first_skipped.append(f"{location}: {err}")
            continue
        report.kept += 1
        yield record
