"""PEFT's prompt-learning and scaling methods: prefix tuning, prompt tuning, P-tuning, IA3, LLaMA-Adapter."""

from __future__ import annotations

from ftl.errors import RecipeError
from ftl.methods.lora import check_target_modules


def peft_config(cfg, task_type: str = "CAUSAL_LM"):
    import peft

    p = cfg.prompt
    if cfg.kind == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task_type)
    if cfg.kind == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=p.num_virtual_tokens, task_type=task_type)
    if cfg.kind == "ptuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=p.num_virtual_tokens,
                                        encoder_hidden_size=p.encoder_hidden_size, task_type=task_type)
    if cfg.kind == "ia3":
        return peft.IA3Config(target_modules=cfg.ia3.target_modules,
                              feedforward_modules=cfg.ia3.feedforward_modules, task_type=task_type)
    if cfg.kind == "llama_adapter":
        return peft.AdaptionPromptConfig(adapter_len=cfg.llama_adapter.adapter_len,
                                         adapter_layers=cfg.llama_adapter.adapter_layers, task_type=task_type)
    raise ValueError(f"not a prompt-learning method: {cfg.kind}")


def apply(model, cfg, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    from peft import get_peft_model

    if cfg.kind == "ia3":
        check_ia3_modules(model, cfg.ia3)
    return get_peft_model(model, peft_config(cfg, task_type))


def check_ia3_modules(model, options) -> None:
    """The defaults name Llama's layers (k_proj, v_proj, down_proj): other models need their own names."""
    check_target_modules(model, options.target_modules, "method.ia3.target_modules")
    outside = [m for m in options.feedforward_modules if m not in options.target_modules]
    if outside:
        raise RecipeError(f"method.ia3.feedforward_modules: {outside} are not in method.ia3.target_modules "
                          f"{options.target_modules} (feed-forward modules are a subset of the targets)")
