"""data.columns: rename a source's columns to the fields its format reads, e.g. {prompt: instruction}
(field ← column, as a recipe reads top-down: "prompt comes from instruction")."""

from __future__ import annotations

from typing import Any

from ftl.data.formats import FIELDS
from ftl.errors import DataError


def check_columns(columns: dict[str, str], key: str) -> None:
    """Refuse a mapping onto a field no format reads (a typo would otherwise map onto nothing)."""
    for name, column in columns.items():
        if name not in FIELDS:
            raise DataError(f"{key}.{name}: not a field ftl reads (fields: {', '.join(FIELDS)}); data.columns "
                            "maps field: column-in-your-data")
        if not isinstance(column, str) or not column:
            raise DataError(f"{key}.{name}: expected a column name, got {column!r}")


def rename_columns(row: Any, columns: dict[str, str], strict: bool = True) -> Any:
    """The row with each mapped column under its field name. A row without a mapped column is a bad row
    (strict), or keeps what it has (for format detection, which reports the columns it saw)."""
    if not columns or not isinstance(row, dict):
        return row
    missing = [f"'{column}' (for {name})" for name, column in columns.items() if column not in row]
    if missing and strict:
        raise ValueError(f"missing column {', '.join(missing)} named in data.columns")
    renamed = {k: v for k, v in row.items() if k not in columns.values()}
    renamed.update({name: row[column] for name, column in columns.items() if column in row})
    return renamed
