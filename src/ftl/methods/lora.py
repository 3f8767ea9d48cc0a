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
