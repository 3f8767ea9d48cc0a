"""The LoRA family through PEFT: LoRA, DoRA, QLoRA (4-bit base) and 8-bit LoRA; base weights frozen."""

from __future__ import annotations


def lora_config(options, use_dora: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=options.target_modules, use_dora=use_dora, task_type=task_type)


def apply(model, cfg, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import get_peft_model, prepare_model_for_kbit_training

    if cfg.kind in ("qlora", "lora8bit"):  # the base was loaded quantised (ftl.methods.METHODS: quant_bits)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, lora_config(cfg.lora, use_dora=cfg.kind == "dora", task_type=task_type))
