"""Full fine-tuning: every weight trains."""


def apply(model, cfg):
    model.requires_grad_(True)
    return model
