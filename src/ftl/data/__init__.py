"""The shared data layer: sources → validated records of one format → de-duplicated splits.

`load_splits` (load.py) assembles the splits from data.source / data.sources / data.splits. Tokenising
(`ftl.data.tokenize`) and packing (`ftl.data.packing`) turn split records into batches. The data layer
never imports a trainer.
"""

from __future__ import annotations

from ftl.data.load import DataReport, load_splits

__all__ = ["DataReport", "load_splits"]
