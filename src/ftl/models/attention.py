"""Whether a recipe trains on packed rows, and whether its attention kernel keeps packed examples apart.

Packed rows (ftl.data.packing) carry restarting position_ids and no attention mask. transformers 5.23
turns them into a block-diagonal causal mask for `sdpa` and `eager` at any batch size
(masking_utils.find_packed_sequence_indices). `flash_attention_2` takes no mask: it finds the examples
from position_ids only when the batch holds ONE row (modeling_flash_attention_utils._is_packed_sequence
returns False for batch_size != 1) and otherwise runs plain causal attention over each whole row, so
packed examples silently attend to each other. A pure function of the recipe, checked before a run.
"""

from __future__ import annotations

from ftl.config.schema import Recipe
from ftl.config.stages import STAGES
from ftl.errors import RecipeError
from ftl.methods import METHODS


def packs_rows(recipe: Recipe) -> bool:
    """data.packing, for a stage that packs, with a method that allows packed rows."""
    return recipe.data.packing and STAGES[recipe.stage].packs and METHODS[recipe.method.kind].packs


def check_attention(recipe: Recipe) -> None:
    """Refuse, by key, an attention implementation that cannot run here or would let packed examples
    attend to each other."""
    attn, batch = recipe.model.attn_implementation, recipe.train.batch_size
    if attn == "flash_attention_2" and recipe.launch.device == "cpu":
        raise RecipeError("model.attn_implementation 'flash_attention_2' runs on CUDA only (the flash-attn "
                          "package), but launch.device is 'cpu': use sdpa on CPU")
    if attn == "flash_attention_2" and batch > 1 and packs_rows(recipe):
        raise RecipeError(
            f"model.attn_implementation 'flash_attention_2' keeps packed examples apart only at train.batch_size "
            f"1 (transformers finds them from position_ids in a one-row batch); with data.packing and "
            f"train.batch_size {batch} the examples in a row would attend to each other: set train.batch_size=1 "
            f"(and raise train.grad_accum), data.packing=false, or model.attn_implementation=sdpa")
