"""data.sources mixed by weight into one training set.

A weight is the share of the training examples drawn from that source (weights are relative: 0.7/0.3 and
7/3 mix alike), the counts fixed rather than left to chance. Named as in datasets.interleave_datasets:

- first_exhausted (the default, as there): no example is used twice. The mix is as large as it can be
  while keeping the shares, so the source that runs out first is used whole and the others in part
  (a seeded sample);
- all_exhausted: every example is used at least once; sources whose share asks for more examples than they
  hold are repeated (whole shuffled passes, then a partial one).

The mixed set is shuffled with data.mix.seed: the same recipe gives the same examples in the same order.
"""

from __future__ import annotations

import random


def mix_counts(sizes: list[int], weights: list[float], strategy: str) -> list[int]:
    """Examples drawn from each source."""
    shares = [w / sum(weights) for w in weights]
    room = [n / p for n, p in zip(sizes, shares)]  # mix size at which a source is used exactly whole
    total = min(room) if strategy == "first_exhausted" else max(room)
    counts = [round(p * total) for p in shares]
    return [min(c, n) if strategy == "first_exhausted" else max(c, n) for c, n in zip(counts, sizes)]


def draw(pool: list[dict], count: int, rng: random.Random) -> list[dict]:
    """`count` examples of the pool: a shuffled pass, repeated while more are needed."""
    picked: list[dict] = []
    while len(picked) < count:
        order = list(range(len(pool)))
        rng.shuffle(order)
        picked += [pool[i] for i in order[: count - len(picked)]]
    return picked


def mix(pools: list[list[dict]], weights: list[float], strategy: str, seed: int) -> tuple[list[dict], list[int]]:
    """(the mixed training examples, how many came from each pool)."""
    counts = mix_counts([len(p) for p in pools], weights, strategy)
    mixed = [record for index, (pool, count) in enumerate(zip(pools, counts))
             for record in draw(pool, count, random.Random(f"mix-{seed}-{index}"))]
    random.Random(f"mix-{seed}").shuffle(mixed)
    return mixed, counts
