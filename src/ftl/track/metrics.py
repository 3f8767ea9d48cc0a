"""metrics.jsonl: one JSON object per logged step, flushed as written; truncated on resume."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything before it is complete
    return rows


class MetricsLog:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None, sinks=()):
        self.path, self.enabled, self.sinks = path, enabled, list(sinks)
        if enabled:
            # A killed run may have logged steps after its last checkpoint: drop them, they are redone.
            kept = [r for r in read_metrics(path) if resume_step is not None and r.get("step", 0) <= resume_step]
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
            self._file = path.open("a")

    def __call__(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        for sink in self.sinks:
            sink(record)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
