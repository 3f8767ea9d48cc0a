"""The splits a run trains and evaluates on, assembled from data.source, data.sources and data.splits.

Training sources (data.source, each of data.sources, or data.splits.train) are read, validated and
de-duplicated (across sources too); the splits not given in data.splits are hash-split off each of them
(data.split); their training parts are mixed by weight (mix.py). A validation or test split given in
data.splits is used as it is, and records it shares with another split are counted, not removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, islice
from typing import Iterator, Optional

from ftl.config.schema import DataConfig, DataSource
from ftl.data.columns import check_columns, rename_columns
from ftl.data.detect import ROWS_LOOKED_AT, detect_format
from ftl.data.formats import FORMATS
from ftl.data.hub import dataset_snapshot
from ftl.data.mix import mix
from ftl.data.records import RowReport, validate_rows
from ftl.data.sources import read_source
from ftl.data.splits import Splits, in_share, overlap, split_records
from ftl.errors import DataError


@dataclass
class SourceReport:
    """What one source gave: rows read and kept, duplicates, records held out and used, for the manifest."""
    key: str                        # data.source, data.sources[1], data.splits.test
    split: str                      # the split it feeds
    origin: str                     # "jsonl source /data/a.jsonl", "chatterbot source"
    format: str                     # its rows' format (what auto chose, when auto)
    weight: Optional[float] = None
    detected: Optional[str] = None  # data.format auto: what it chose, from which columns
    rows: RowReport = field(default_factory=RowReport)
    duplicates: int = 0
    held_out: dict = field(default_factory=dict)  # records hash-split off to validation / test
    used: int = 0                   # examples it gives its split (training: drawn by the mix, repeats counted)

    def as_dict(self) -> dict:
        out = {"key": self.key, "split": self.split, "origin": self.origin, "format": self.format,
               "read": self.rows.read, "kept": self.rows.kept, "used": self.used}
        if self.rows.skipped:
            out["skipped"] = dict(self.rows.skipped)
        if self.split == "train":
            out.update(duplicates=self.duplicates, held_out=self.held_out, weight=self.weight)
        if self.detected:
            out["detected"] = self.detected
        return out


@dataclass
class DataReport:
    sources: list[SourceReport] = field(default_factory=list)
    overlap: Optional[dict] = None  # given splits: records a split shares with another

    @property
    def rows(self) -> RowReport:
        total = RowReport()
        for source in self.sources:
            total.add(source.rows)
        return total

    @property
    def read(self) -> int:
        return self.rows.read

    @property
    def kept(self) -> int:
        return self.rows.kept

    @property
    def skipped(self):
        return self.rows.skipped

    @property
    def first_skipped(self) -> list[str]:
        return self.rows.first_skipped

    def kinds(self, split: Optional[str] = None) -> set[str]:
        """The kinds of record the sources gave (those of one split, when named; a split hash-split from train:
        train's). Under data.format auto the recipe's format says nothing about them."""
        sources = [s for s in self.sources if split is None or s.split == split] or \
            [s for s in self.sources if s.split == "train"]
        return {FORMATS[s.format].kind for s in sources if s.format in FORMATS}

    def notes(self) -> list[str]:
        """Lines for the console: formats auto chose, overlap between given splits."""
        lines = [f"ftl: {s.detected}" for s in self.sources if s.detected]
        shared = {pair: n for pair, n in (self.overlap or {}).items() if n}
        if shared:
            said = ", ".join(f"{n} {pair.split('/')[1]} record{'s' if n > 1 else ''} also in {pair.split('/')[0]}"
                             for pair, n in shared.items())
            lines.append(f"ftl: warning: data.splits overlap: {said} (identical records; given splits are used "
                         "as they are)")
        return lines

    def as_manifest(self) -> dict:
        out = {"rows": self.rows.as_dict(), "sources": [s.as_dict() for s in self.sources]}
        if self.overlap is not None:
            out["overlap"] = self.overlap
        return out


def load_splits(cfg: DataConfig) -> tuple[Splits, DataReport]:
    report = DataReport()
    given = [(key, split, source) for key, split, source in cfg.entries() if split != "train"]
    held = {name: 0.0 if any(split == name for _, split, _ in given) else getattr(cfg.split, name)
            for name in ("validation", "test")}
    splits, pools, seen = Splits(), [], set()
    for key, split, source in cfg.entries():
        if split != "train":
            continue
        source_report = open_report(key, split, source, cfg, report)
        records = read_records(key, source, cfg, source_report)
        if cfg.share.of > 1:
            records = (r for r in records if in_share(r, cfg.share.index, cfg.share.of))
        if cfg.limit:
            records = islice(records, cfg.limit)
        part = split_records(records, held["validation"], held["test"], cfg.split.seed, seen)
        splits.validation += part.validation
        splits.test += part.test
        splits.duplicates_dropped += part.duplicates_dropped
        source_report.duplicates = part.duplicates_dropped
        source_report.held_out = {"validation": len(part.validation), "test": len(part.test)}
        pools.append(part.train)
    training = [s for s in report.sources if s.split == "train"]
    if len(pools) > 1:
        for pool, source_report in zip(pools, training):
            if not pool:
                raise DataError(f"{source_report.key}: no training records from {source_report.origin}; "
                                f"{describe_counts(source_report)}")
        splits.train, used = mix(pools, [s.weight or 1.0 for s in training], cfg.mix.stopping_strategy, cfg.mix.seed)
    else:
        splits.train, used = pools[0], [len(pools[0])]
    for source_report, count in zip(training, used):
        source_report.used = count
    for key, split, source in given:  # used as they are: no de-duplication, no data.share
        source_report = open_report(key, split, source, cfg, report)
        setattr(splits, split, list(islice(read_records(key, source, cfg, source_report), cfg.limit)))
        source_report.used = len(getattr(splits, split))
    if given:
        report.overlap = overlap(splits)
    if not splits.train:
        raise DataError(no_training_records(training, splits))
    return splits, report


def open_report(key: str, split: str, source: DataSource, cfg: DataConfig, report: DataReport) -> SourceReport:
    origin = f"{source.kind} source" + (f" {source.path}" if source.path else "")
    if source.kind == "hub":  # the commit the cache resolved, so the manifest says which data ran
        origin = f"hub dataset {source.name} (commit {dataset_snapshot(source).commit})"
    source_report = SourceReport(key, split, origin, cfg.format_of(source), weight=source.weight)
    report.sources.append(source_report)
    return source_report


def read_records(key: str, source: DataSource, cfg: DataConfig, report: SourceReport) -> Iterator[dict]:
    """The source's valid records in its format (detected from the first rows under data.format auto)."""
    columns = {**cfg.columns, **source.columns}
    check_columns(columns, f"{key}.columns" if source.columns else "data.columns")
    fmt = cfg.format_of(source)
    rows = read_source(source, fmt, key)
    if fmt == "auto":
        head = list(islice(rows, ROWS_LOOKED_AT))
        if not head:
            return iter(())
        fmt, said = detect_format([(location, rename_columns(row, columns, strict=False)) for location, row in head],
                                  key)
        report.format = fmt
        named = f"{key}.format" if source.format or key != "data.source" else "data.format"
        report.detected = f"{named} auto -> {said}"
        rows = chain(head, rows)
    convert = FORMATS[fmt].convert
    return validate_rows(rows, lambda row: convert(rename_columns(row, columns)), fmt, cfg.on_bad_row, report.rows)


def describe_counts(source: SourceReport) -> str:
    if not source.rows.read:
        return "it holds no rows"
    if not source.rows.kept:
        return f"every row was rejected ({source.rows.read} read; {source.rows.rejections()})"
    return (f"{source.rows.read} read, {source.rows.kept} valid, {source.duplicates} duplicates, "
            f"{sum(source.held_out.values())} held out for validation/test")


def no_training_records(training: list[SourceReport], splits: Splits) -> str:
    if len(training) > 1:
        return "data: no training records: " + "; ".join(f"{s.key}: {describe_counts(s)}" for s in training)
    source = training[0]
    if not source.rows.read:
        return f"data: {source.origin} holds no rows"
    if not source.rows.kept:
        return f"data: every row of {source.origin} was rejected ({source.rows.read} read; {source.rows.rejections()})"
    return (f"data: no training records left from {source.origin} ({source.rows.read} read, {source.rows.kept} "
            f"valid, {splits.duplicates_dropped} duplicates, {source.held_out.get('validation', 0)} to validation, "
            f"{source.held_out.get('test', 0)} to test after data.share, data.limit and data.split)")
