"""Deterministic splits by content hash, with exact de-duplication and fingerprints.

A record goes to a split by the hash of its *group key* (the prompt, the first user turn or the
text), so exact duplicates and answers to the same question never straddle two splits.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field


def record_hash(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def group_key(record: dict) -> str:
    """The question a record answers: its first user turn (a conversation, a conversational prompt), else its
    prompt or text."""
    for name in ("messages", "prompt"):
        if isinstance(record.get(name), list):
            first_user = next((m["content"] for m in record[name] if m["role"] == "user"), "")
            return first_user or record_hash(record)
    for name in ("prompt", "text"):
        if name in record:
            return record[name]
    return record_hash(record)


def unit_interval(key: str, salt: str) -> float:
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).hexdigest()
    return int(digest[:12], 16) / float(16**12)


@dataclass
class Splits:
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    duplicates_dropped: int = 0

    def fingerprints(self) -> dict[str, str]:
        return {name: fingerprint(getattr(self, name)) for name in ("train", "validation", "test")}

    def sizes(self) -> dict[str, int]:
        return {name: len(getattr(self, name)) for name in ("train", "validation", "test")}


def fingerprint(records: list[dict]) -> str:
    digest = hashlib.sha256()
    for h in sorted(record_hash(r) for r in records):
        digest.update(h.encode())
    return digest.hexdigest()[:16]


def split_records(records, validation: float, test: float, seed: int, seen: set[str] | None = None) -> Splits:
    """`seen`: hashes of records already taken (from earlier sources), dropped as duplicates here too."""
    splits = Splits()
    seen = set() if seen is None else seen
    for record in records:
        h = record_hash(record)
        if h in seen:
            splits.duplicates_dropped += 1
            continue
        seen.add(h)
        u = unit_interval(group_key(record), f"split-{seed}")
        if u < test:
            splits.test.append(record)
        elif u < test + validation:
            splits.validation.append(record)
        else:
            splits.train.append(record)
    return splits


SPLIT_PAIRS = (("train", "validation"), ("train", "test"), ("validation", "test"))


def overlap(splits: Splits) -> dict[str, int]:
    """For each pair of splits, how many records of the second are also in the first (the same record,
    by the de-duplication hash): given splits are used as they are, so this is reported, not removed."""
    hashes = {name: {record_hash(r) for r in getattr(splits, name)} for name in ("train", "validation")}
    return {f"{first}/{second}": sum(record_hash(r) in hashes[first] for r in getattr(splits, second))
            for first, second in SPLIT_PAIRS}


def in_share(record: dict, index: int, of: int) -> bool:
    """Disjoint shares by group key: the same question lands in the same share whatever its format
    (a chat, a preference pair or a bare prompt), so RLHF stages never see each other's examples."""
    return of == 1 or int(unit_interval(group_key(record), "share") * of) == index
