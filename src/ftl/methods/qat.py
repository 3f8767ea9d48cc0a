"""Quantization-aware fine-tuning (`method.qat`) with torchao's QAT API.

prepare: before training, every linear layer except the output head becomes a torchao
  `FakeQuantizedLinear`: the forward pass rounds its weights (and, with `activations`, its inputs)
  to the target integer grid while the weights themselves stay fp32 and keep training
  (straight-through gradients). State-dict keys do not change, so the run's `final/` folder is a
  normal fp32 checkpoint.
convert: after training, torchao's convert step swaps the fake-quantised layers back and applies the
  matching post-training quantisation config: weights become real integers (`IntxUnpackedToInt8Tensor`:
  int8 storage, per-group scales and zero points); with `activations`, inputs are quantised
  dynamically to int8 per token at inference.
ptq: the same real quantisation applied to any plain model (the baseline QAT is compared with).

The quantisation scheme comes from `method.qat`:
  weights int4|int8, symmetric, one scale per `group_size` consecutive input weights;
  activations false → `IntxWeightOnlyConfig`; true → `Int8DynamicActivationIntxWeightConfig`.
The output head (`lm_head`, usually tied to or as large as the embeddings) and embeddings stay fp32.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ftl.errors import RecipeError

SUPPORTED_KINDS = ("full",)


def base_config(qat):
    """The torchao post-training config QAT trains for (and converts/PTQs with)."""
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    dtype = {"int4": torch.int4, "int8": torch.int8}[qat.weight_dtype]
    if qat.activations:
        return Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerGroup(qat.group_size))
    return IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(qat.group_size))


def skipped_names(model) -> set[str]:
    """Linear layers kept in full precision: the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def target_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers QAT fake-quantises and convert/PTQ really quantise (fake-quantised ones included)."""
    skip = skipped_names(model)
    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in skip}


def _filter(skip: set[str]):
    return lambda module, fqn: isinstance(module, torch.nn.Linear) and fqn not in skip


def check_supported(method) -> None:
    if method.kind not in SUPPORTED_KINDS:
        raise RecipeError(f"method.qat is enabled with method.kind '{method.kind}': quantization-aware training "
                          f"works with method.kind {' or '.join(SUPPORTED_KINDS)} (adapters would train in fp32 "
                          "beside a frozen base, so there is nothing to make quantisation-aware); set "
                          "method.kind: full or method.qat.enabled: false")


def check_group_size(model, qat) -> None:
    """Every quantised layer's input width must be a whole number of groups."""
    linears = target_linears(model)
    if not linears:
        raise RecipeError("method.qat: the model has no linear layers to quantise")
    bad = {name: m.in_features for name, m in linears.items() if m.in_features % qat.group_size}
    if bad:
        name, width = next(iter(bad.items()))
        common = math.gcd(*(m.in_features for m in linears.values()))
        fits = [g for g in (2 ** k for k in range(1, 11)) if common % g == 0]
        raise RecipeError(f"method.qat.group_size {qat.group_size} does not divide the input width of "
                          f"{len(bad)} linear layer(s) (e.g. {name}: in_features {width}); "
                          f"group sizes that fit this model: {fits or [common]}")


def prepare(model, method):
    """Swap the target linear layers for fake-quantised ones, in place (call before training)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    check_supported(method)
    check_group_size(model, method.qat)
    quantize_(model, QATConfig(base_config(method.qat), step="prepare"), filter_fn=_filter(skipped_names(model)))
    return model


def fake_quantized_layers(model) -> dict[str, torch.nn.Module]:
    from torchao.quantization.qat import FakeQuantizedLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, FakeQuantizedLinear)}


def convert(model, qat):
    """Fake-quantised model → really quantised model, in place (torchao's convert step)."""
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    if not fake_quantized_layers(model):
        raise ValueError("convert: the model has no fake-quantised layers (was it prepared with method.qat?)")
    quantize_(model, QATConfig(base_config(qat), step="convert"), filter_fn=None)
    return model


def ptq(model, qat):
    """Post-training quantisation of a plain model with the same config convert uses, in place."""
    from torchao.quantization import quantize_

    check_group_size(model, qat)
    quantize_(model, base_config(qat), filter_fn=_filter(skipped_names(model)))
    return model


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes, counting every inner tensor of a torchao tensor subclass (data, scales, zero points)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names if getattr(tensor, n) is not None)
    return tensor.numel() * tensor.element_size()


def is_quantized(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "__tensor_flatten__") and getattr(tensor, "qdata", None) is not None \
        and not tensor.qdata.is_floating_point()


def weight_bytes(model) -> dict:
    """Bytes of the quantisable linear weights as stored now, against the same weights in fp32."""
    linears = target_linears(model)
    stored = sum(tensor_bytes(m.weight) for m in linears.values())
    numel = sum(m.weight.numel() for m in linears.values())
    every = {id(p): p for p in list(model.parameters()) + list(model.buffers())}.values()
    return {"linear_weight_bytes": stored, "linear_weight_bytes_fp32": numel * 4,
            "model_bytes": sum(tensor_bytes(p) for p in every),
            "quantized_layers": sum(is_quantized(m.weight) for m in linears.values())}


def save_quantized(fp32_dir: Path, target: Path, qat, tokenizer=None, dtype: torch.dtype = torch.float32) -> Path:
    """Write the really quantised model as a normal transformers folder (safetensors + a torchao
    `quantization_config`), loadable with `AutoModelForCausalLM.from_pretrained(target)`.

    Built by loading the fp32 QAT weights through transformers' TorchAoConfig with the same base config:
    exactly what `convert` produces (convert = swap back to nn.Linear + apply the base config), but with
    the quantiser attached, so transformers can serialise the tensor subclasses.
    """
    import os
    import shutil

    from transformers import AutoModelForCausalLM, TorchAoConfig

    config = TorchAoConfig(base_config(qat), modules_to_not_convert=_head_names(fp32_dir))
    model = AutoModelForCausalLM.from_pretrained(fp32_dir, dtype=dtype, quantization_config=config)
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def _head_names(model_dir: Path) -> list[str]:
    """Names of the output head in a saved causal LM, built on the meta device (no weights read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sorted(skipped_names(model))
