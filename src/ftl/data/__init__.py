"""The shared data layer: sources → validated records of one format → de-duplicated splits.

Tokenising (`ftl.data.tokenize`) and packing (`ftl.data.packing`) turn split records into batches.
The data layer never imports a trainer.
"""

from __future__ import annotations

from itertools import islice

from ftl.config.schema import DataConfig
from ftl.data.records import RowReport, validate_rows
from ftl.data.sources import read_source
from ftl.data.splits import Splits, in_share, split_records
from ftl.errors import DataError


def load_splits(cfg: DataConfig) -> tuple[Splits, RowReport]:
    report = RowReport()
    records = validate_rows(read_source(cfg.source, cfg.format), cfg.format, cfg.on_bad_row, report)
    if cfg.share.of > 1:
        records = (r for r in records if in_share(r, cfg.share.index, cfg.share.of))
    if cfg.limit:
        records = islice(records, cfg.limit)
    splits = split_records(records, cfg.split.validation, cfg.split.test, cfg.split.seed)
    if not splits.train:
        raise DataError(no_training_records(cfg, report, splits))
    return splits, report


def no_training_records(cfg: DataConfig, report: RowReport, splits: Splits) -> str:
    where = f"{cfg.source.kind} source" + (f" {cfg.source.path}" if cfg.source.path else "")
    if not report.read:
        return f"data: {where} holds no rows"
    if not report.kept:
        return f"data: every row of {where} was rejected ({report.read} read; {report.rejections()})"
    return (f"data: no training records left from {where} ({report.read} read, {report.kept} valid, "
            f"{splits.duplicates_dropped} duplicates, {len(splits.validation)} to validation, "
            f"{len(splits.test)} to test after data.share, data.limit and data.split)")
