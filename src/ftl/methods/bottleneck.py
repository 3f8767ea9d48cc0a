"""Bottleneck adapters (Houlsby et al. 2019): down-projection, nonlinearity, zero-initialised
up-projection and a residual, after the attention and the MLP block of every decoder layer.

PEFT has none, and AdapterHub's `adapters` would downgrade transformers, so ftl provides it. The
up-projection starts at zero, so the adapted model starts exactly equal to the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ftl.config.schema import AdapterOptions

ADAPTER_FILE = "bottleneck_adapter.safetensors"
CONFIG_FILE = "bottleneck_adapter.json"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
POSITIONS = {"attention": "self_attn", "mlp": "mlp"}


class Bottleneck(nn.Module):
    def __init__(self, width: int, bottleneck: int, activation: str):
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(self.act(self.down(hidden)))


class Adapted(nn.Module):
    """A block whose output (or first output, for attention) goes through a bottleneck adapter."""

    def __init__(self, block: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, *args, **kwargs):
        out = self.block(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]),) + out[1:]
        return self.adapter(out)


def decoder_layers(model) -> list[nn.Module]:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError("bottleneck adapters need a decoder with model.layers (Llama-style)")
    return list(layers)


def insert_adapters(model, options) -> nn.Module:
    width = model.config.hidden_size
    for layer in decoder_layers(model):
        for position in options.positions:
            name = POSITIONS[position]
            block = getattr(layer, name)
            if not isinstance(block, Adapted):
                dtype = next(block.parameters()).dtype
                setattr(layer, name, Adapted(block, Bottleneck(width, options.bottleneck, options.activation).to(dtype)))
    return model


def apply(model, cfg, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    model.requires_grad_(False)
    insert_adapters(model, cfg.adapter)
    for name, param in model.named_parameters():
        param.requires_grad_(".adapter." in name)
    return model


def adapter_state(state_dict: dict) -> dict:
    return {k: v.contiguous() for k, v in state_dict.items() if ".adapter." in k}


def save_adapter(model, state_dict: dict, target: Path, options) -> None:
    from safetensors.torch import save_file

    target.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(state_dict), str(target / ADAPTER_FILE))
    (target / CONFIG_FILE).write_text(json.dumps(options.model_dump(), indent=1))


def load_adapter(model, source: Path):
    from safetensors.torch import load_file

    options = AdapterOptions.model_validate(json.loads((source / CONFIG_FILE).read_text()))
    insert_adapters(model, options)
    missing = model.load_state_dict(load_file(str(source / ADAPTER_FILE)), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{source}: adapter weights do not fit this model: {missing.unexpected_keys[:3]}")
    return model
