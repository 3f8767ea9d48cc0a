"""Where `ftl eval` runs: the device is decided once (`eval_device`), the model is put there unless
bitsandbytes placed it (`place`), and batches follow the model (`model_device`), never a fixed CPU."""

from __future__ import annotations

import torch

from ftl.errors import LaunchError

DEVICES = ("auto", "cpu", "cuda")


def eval_device(requested: str, cuda_available: bool) -> torch.device:
    """auto: CUDA when this machine has it, else CPU. cuda without CUDA is refused, not a quiet fallback."""
    if requested not in DEVICES:
        raise LaunchError(f"--device {requested}: one of {', '.join(DEVICES)}")
    if requested == "cuda" and not cuda_available:
        raise LaunchError(f"--device cuda but torch {torch.__version__} sees no CUDA device "
                          "(a CPU-only torch build, or CUDA_VISIBLE_DEVICES empty); use --device cpu or auto")
    use_cuda = requested == "cuda" or (requested == "auto" and cuda_available)
    return torch.device("cuda") if use_cuda else torch.device("cpu")


def is_quantized(model) -> bool:
    """Loaded by a bitsandbytes quantizer (4/8-bit): PEFT wrappers forward these attributes to the base."""
    return (getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_loaded_in_4bit", False))
            or bool(getattr(model, "is_loaded_in_8bit", False)))


def place(model, device: torch.device):
    """The model on `device`; a quantized model stays where it was loaded (bitsandbytes refuses `.to`
    on 4-bit models, and its device_map already chose the GPU)."""
    return model if is_quantized(model) else model.to(device)


def model_device(model) -> torch.device:
    """Where the model's weights are (its first parameter): inputs must be there too."""
    return next(model.parameters()).device
