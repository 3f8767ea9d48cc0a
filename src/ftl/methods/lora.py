"""The LoRA family through PEFT: LoRA, DoRA, QLoRA (4-bit base) and 8-bit LoRA; base weights frozen."""

from __future__ import annotations

import torch

from ftl.errors import RecipeError


def lora_config(options, use_dora: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=options.target_modules, use_dora=use_dora, task_type=task_type)


def apply(model, cfg, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_target_modules(model, cfg.lora.target_modules, "method.lora.target_modules")
    if cfg.kind in ("qlora", "lora8bit"):  # the base was loaded quantised (ftl.methods.METHODS: quant_bits)
        # the same non-reentrant checkpointing models.load enables (PEFT would re-enable the reentrant default)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    return get_peft_model(model, lora_config(cfg.lora, use_dora=cfg.kind == "dora", task_type=task_type))


def check_target_modules(model, targets, key: str) -> None:
    """Every listed name must match a module the way PEFT matches (the full name, or its last parts):
    PEFT fails with a traceback when none does, and silently adapts fewer modules when some do not."""
    if isinstance(targets, str):  # "all-linear"
        return
    names = [name for name, _ in model.named_modules()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise RecipeError(f"{key}: {missing} match no module of {type(model).__name__}; its linear layers "
                          f"are {linear_module_names(model)}")


def linear_module_names(model) -> list[str]:
    """Short names (the last part) of the model's linear layers, each once: what target_modules lists."""
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers; here so `ftl plan` skips transformers

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and name})


def store_frozen_linears_16bit(model, dtype: torch.dtype = torch.bfloat16) -> int:
    """Keep the frozen fp32 linear weights of a LoRA model in `dtype`, for a run whose every training forward
    runs under `dtype` autocast (train.precision bf16 without DeepSpeed). Exact there: autocast hands a linear
    layer its fp32 weight rounded to bf16 (round-to-nearest-even), the same values this stores once; the layer's
    input and output dtypes, the LoRA path beside it and every gradient are unchanged. What it saves: half of
    the frozen weights' bytes, and the bf16 copy autocast made of each of them in every forward and kept for
    backward (SmolLM2-135M: 0.21 GB of each). Untouched: anything that trains, biases-free or not, embeddings
    and a head tied to them (an embedding lookup is not autocast), layers already in 16 bits or quantised.
    Outside autocast (greedy samples from an unwrapped PEFT model) a stored layer computes with its weight
    cast to the input's dtype, i.e. with the bf16-rounded weights. The weights transformers loaded are views of
    the memory-mapped checkpoint: the frozen tensors left are copied out of it, so the fp32 file's pages are not
    resident beside their bf16 copies (they would be, once read, while any view lives). Returns the number of
    layers stored."""
    import types

    tied = {id(p) for p in model.get_input_embeddings().parameters()} if hasattr(model, "get_input_embeddings") else set()
    stored = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear:  # exactly nn.Linear: not LoRA wrappers, bnb or fake-quant layers
            continue
        weight = module.weight
        if weight.requires_grad or id(weight) in tied or weight.dtype != torch.float32 or weight.device.type == "meta":
            continue
        if module.bias is not None and module.bias.requires_grad:
            continue
        module.weight = torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        module.forward = types.MethodType(_frozen_16bit_forward, module)
        stored += 1
    if stored:  # what remains a view of the checkpoint's memory map (embeddings, norms) is copied out of it:
        for tensor in [*model.parameters(), *model.buffers()]:  # while one view lives, every page read of the
            if tensor.device.type == "cpu" and not tensor.requires_grad:  # fp32 file stays resident
                tensor.data = tensor.data.clone()
    return stored


def _frozen_16bit_forward(self, x):
    if torch.is_autocast_enabled(x.device.type) or x.dtype == self.weight.dtype:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, self.weight.to(x.dtype), bias)
