"""train.compile: the model's transformer blocks compiled with torch.compile for the training steps only."""

from __future__ import annotations

from typing import Callable

import torch

from ftl.errors import RecipeError
from ftl.train import controls
from ftl.train.distributed import uses_deepspeed


class CompiledBlocks:
    """train.compile: each transformer block compiled with torch.compile (inductor). The blocks are alike, so
    they share one compiled graph per kind of input; the model's head (which the chunked loss swaps per forward)
    and its mask building stay eager. Compiled code runs in the training steps only: evaluation and generation
    (other shapes, a KV cache) run the same blocks eagerly (`eagerly`), and so does everything after `release`."""

    def __init__(self, accelerator, model, layout: controls.Layout):
        if uses_deepspeed(accelerator):
            raise RecipeError("train.compile: compiling under DeepSpeed is not supported by ftl (its ZeRO hooks "
                              "gather parameters inside the blocks); set train.compile: false or train without "
                              "launch.deepspeed")
        if layout.block_path is None:
            raise RecipeError(f"train.compile: ftl found no list of transformer blocks in {type(model).__name__} to "
                              "compile; set train.compile: false")
        self.blocks = list(model.get_submodule(layout.block_path))
        for block in self.blocks:
            block.compile(dynamic=None)  # the first new sequence length recompiles once with dynamic shapes
        self.compiled = [block._compiled_call_impl for block in self.blocks]
        accelerator.print(f"ftl: train.compile: {len(self.blocks)} blocks ({layout.block_path}) compiled with "
                          "torch.compile (inductor) for the training steps; the first steps include the compile time")
        self.info = {"enabled": True, "blocks": len(self.blocks), "block_path": layout.block_path,
                     "backend": "inductor", "torch": torch.__version__}

    def release(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None

    def eagerly(self, fn: Callable) -> Callable:
        """fn run with the blocks eager (compiled again afterwards)."""
        def run(*args, **kwargs):
            self.release()
            try:
                return fn(*args, **kwargs)
            finally:
                for block, compiled in zip(self.blocks, self.compiled):
                    block._compiled_call_impl = compiled
        return run
