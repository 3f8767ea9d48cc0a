"""One evaluation pass shared by every metric: each rank scores its share of the examples in eval mode,
and the per-rank sums are added across ranks. Every rank runs the same number of batches (see
`batches_per_rank`): under ZeRO-3 each forward is a collective, so a rank that stopped early would leave
the others waiting forever."""

from __future__ import annotations

from typing import Callable

import torch

from ftl.evaluate.device import model_device
from ftl.track.memory import release_freed_memory


def batches_per_rank(n_features: int, world: int, batch_size: int) -> int:
    """Batches of the largest share (rank 0's ceil(n / world) features): what every rank runs."""
    largest_share = -(-n_features // world)
    return -(-largest_share // batch_size)


@torch.no_grad()
def sum_over_ranks(model, features: list[dict], batch_size: int, collate: Callable[[list[dict]], dict],
                   measure: Callable[[dict], torch.Tensor], size: int, accelerator=None) -> torch.Tensor:
    """Sum of measure(batch) (a vector of `size` sums) over all features, sharded across ranks."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    # the accelerator placed the model (and owns the reduce's device); alone, batches follow the model
    device = accelerator.device if accelerator else model_device(model)
    was_training = model.training
    model.eval()
    totals = torch.zeros(size, dtype=torch.float64, device=device)
    mine = features[rank::world]
    for b in range(batches_per_rank(len(features), world, batch_size)):
        rows = mine[b * batch_size:(b + 1) * batch_size]
        # an exhausted share still runs a forward (ZeRO-3's collectives must match) and discards it
        batch = {k: v.to(device) for k, v in collate(rows or features[:1]).items()}
        measured = measure(batch)
        if rows:
            totals += measured.to(device=device, dtype=torch.float64)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    release_freed_memory()  # the pass's freed buffers: not resident under the next phase's (see ftl.track.memory)
    return totals
