"""Full fine-tuning: every weight trains."""


def apply(model, cfg, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    model.requires_grad_(True)
    return model
