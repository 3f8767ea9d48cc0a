"""2-rank worker for tests/test_critic_free.py (started by torchrun, gloo): REINFORCE++'s advantages, whose
normalisation must use the mean and std over the response tokens of both ranks. Each rank holds different
responses with a different number of tokens; rank 0 writes {world_size, advantages: [rank 0's, rank 1's]} as
JSON to the path given as argv[1]."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from ftl.config.schema import PPOConfig
from ftl.rl.advantages import advantages

# per rank: scores [B], per-token KL [B, R], mask [B, R] (rank 0: 5 tokens, rank 1: 4 tokens)
BATCHES = {
    0: ([1.0, 3.0], [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1, 1, 1], [1, 1, 0]]),
    1: ([2.0, -1.0], [[0.0, 0.0, 0.0], [2.0, 0.0, 0.0]], [[1, 1, 1], [1, 0, 0]]),
}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    scores, kl, mask = (torch.tensor(x, dtype=torch.float32) for x in BATCHES[rank])
    adv, returns = advantages("reinforce_pp", scores, kl * mask, mask, None, PPOConfig(advantage="reinforce_pp",
                                                                                       kl_coef=0.5))
    assert returns is None
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, adv.tolist())
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"world_size": dist.get_world_size(), "advantages": gathered}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
