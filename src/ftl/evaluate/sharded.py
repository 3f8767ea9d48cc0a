"""One evaluation pass shared by every metric: each rank scores its share of the examples in eval mode,
and the per-rank sums are added across ranks."""

from __future__ import annotations

from typing import Callable

import torch

from ftl.evaluate.device import model_device


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
    for start in range(0, len(mine), batch_size):
        batch = {k: v.to(device) for k, v in collate(mine[start:start + batch_size]).items()}
        totals += measure(batch).to(device=device, dtype=torch.float64)
    if world > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    return totals
