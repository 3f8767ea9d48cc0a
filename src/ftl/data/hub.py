"""The `hub` source kind: a dataset repo on the Hugging Face hub (`data.source.name`, `revision`), read from
huggingface_hub's cache like a hub model (fetched there first when there is network).

Which files: `data.source.files` patterns, else the split's files found by `datasets`' own conventions
(`train.jsonl`, `data/train-00000-of-00001.parquet`, `train/` folders, or every data file for train).
Each file is read by the reader of its kind (jsonl, json, csv, parquet), so rows and errors behave as
for a local file; errors name the file inside the snapshot.
"""

from __future__ import annotations

import json
from pathlib import Path

from ftl.config.schema import SourceConfig
from ftl.errors import DataError
from ftl.hub_cache import Snapshot, hub_snapshot

KINDS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}  # suffix → source kind


def dataset_snapshot(source: SourceConfig, key: str = "data.source") -> Snapshot:
    """`key`: where the recipe names this source (data.source, data.sources[i], data.splits.NAME)."""
    patterns = tuple(source.files) if source.files else None  # with network, fetch only what is read
    return hub_snapshot(source.name, source.revision, "dataset", f"{key}.name", DataError, patterns)


def read_hub(source: SourceConfig, fmt: str):
    from ftl.data.sources import SOURCES  # sources.py imports this module for its table row

    snapshot = dataset_snapshot(source)
    for path in data_files(snapshot, source):
        kind = file_kind(path)
        yield from SOURCES[kind].read(source.model_copy(update={"kind": kind, "path": str(path)}), fmt)


def data_files(snapshot: Snapshot, source: SourceConfig) -> list[Path]:
    where = f"data.source: hub dataset {snapshot.repo_id!r} (commit {snapshot.commit[:12]})"
    files = sorted(p for p in snapshot.path.rglob("*") if p.is_file() and not p.name.startswith("."))
    relative = [p.relative_to(snapshot.path).as_posix() for p in files]
    if source.files:
        from huggingface_hub.utils import filter_repo_objects

        chosen = list(filter_repo_objects(relative, allow_patterns=source.files))
        if not chosen:
            raise DataError(f"{where}: no file matches data.source.files {source.files} (it holds {relative})")
    else:
        chosen = split_files(snapshot.path, source.split or "train", where, relative)
    unreadable = [name for name in chosen if Path(name).suffix not in KINDS]
    if unreadable:
        raise DataError(f"{where}: cannot read {unreadable}: hub datasets are read from "
                        f"{', '.join(KINDS)} files (choose others with data.source.files)")
    return [snapshot.path / name for name in chosen]


def split_files(folder: Path, split: str, where: str, relative: list[str]) -> list[str]:
    """The split's data files as `datasets.load_dataset` would pick them from this folder."""
    from datasets.data_files import get_data_patterns, resolve_pattern

    try:
        patterns = get_data_patterns(str(folder))
    except FileNotFoundError:  # datasets' EmptyDatasetError: no data file at all
        raise DataError(f"{where}: no data files in the snapshot (it holds {relative})") from None
    if split not in patterns:
        raise DataError(f"{where}: no split '{split}' (found: {', '.join(patterns)}): set data.source.split, "
                        "or data.source.files")
    found = set()
    for pattern in patterns[split]:
        try:
            found.update(resolve_pattern(pattern, str(folder), allowed_extensions=list(KINDS)))
        except FileNotFoundError:
            continue
    chosen = sorted(Path(p).relative_to(folder).as_posix() for p in found)
    if not chosen:
        raise DataError(f"{where}: split '{split}' has no {', '.join(KINDS)} files (the snapshot holds {relative})")
    return chosen


def file_kind(path: Path) -> str:
    """The reader for a file; a `.json` file on the hub is often JSON Lines (as `datasets` reads it too)."""
    kind = KINDS[path.suffix]
    if kind == "json" and is_json_lines(path):
        return "jsonl"
    return kind


def is_json_lines(path: Path) -> bool:
    """True when the first non-empty line is a whole JSON object of its own (a row), not the start of a
    JSON document or a {"data": [...]} wrapper."""
    with path.open("rb") as f:
        for raw in f:
            if raw.strip():
                try:
                    first = json.loads(raw)
                except ValueError:
                    return False
                return isinstance(first, dict) and not isinstance(first.get("data"), list)
    return False
