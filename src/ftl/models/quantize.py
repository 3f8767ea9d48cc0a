"""bitsandbytes 4-bit (NF4, double quantisation) and 8-bit loading, and the CPU 4-bit gradient guard."""

from __future__ import annotations

from typing import Optional


def bnb_config(bits: Optional[int], options):
    if bits is None:
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.quant_type,
                              bnb_4bit_use_double_quant=options.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, options.compute_dtype))


def guard_cpu_4bit_gradients(model) -> int:
    """Keep 4-bit layers on the autograd-capable CPU path.

    On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference on the first eval-mode
    no-grad forward; backward then runs through `gemv_4bit`, which has no autograd kernel, and LoRA
    gradients come out 58-70% wrong with only a warning. Turning the fast path off keeps them exact.
    Returns the number of layers guarded.
    """
    import bitsandbytes as bnb

    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def own_unquantised_weights(model) -> int:
    """Copy every CPU parameter bitsandbytes left unquantised (embeddings, norms, a tied lm_head) out of the
    checkpoint's memory map. transformers loads them as views of the mapped safetensors file, and while one
    view lives the whole mapping stays resident: every page the quantiser read, the full-precision weights
    it replaced (SmolLM2-135M on CPU: 427 MB resident for a 112 MB 4-bit model). Returns the tensors copied."""
    import bitsandbytes as bnb

    copied = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.device.type == "cpu" and not isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                param.data = param.data.clone()
                copied += 1
    return copied


def weight_bytes(model) -> int:
    """Bytes of all parameters and buffers as stored, with 4-bit constants and 8-bit row scales."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) + sum(
        quant_constant_bytes(getattr(m, "weight", None)) for m in model.modules())


def linear_weight_bytes(model) -> int:
    """Bytes of the linear layers a quantiser replaces (all but lm_head), as stored."""
    import torch

    return sum(m.weight.numel() * m.weight.element_size() + quant_constant_bytes(m.weight)
               for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"))


def quant_constant_bytes(weight) -> int:
    if weight is None:
        return 0
    total = 0
    state = getattr(weight, "quant_state", None)  # 4-bit: absmax (+ nested) and code book
    if state is not None:
        total += sum(t.numel() * t.element_size() for t in _state_tensors(state))
    scales = getattr(weight, "SCB", None)  # 8-bit: one scale per row
    if scales is not None:
        total += scales.numel() * scales.element_size()
    return total


def _state_tensors(state):
    for name in ("absmax", "code"):
        value = getattr(state, name, None)
        if value is not None:
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _state_tensors(nested)
