"""LoRA through PEFT: low-rank updates on the chosen linear layers, base weights frozen."""

from __future__ import annotations


def lora_config(options, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=options.target_modules, task_type=task_type)


def apply(model, cfg):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(cfg.lora))
