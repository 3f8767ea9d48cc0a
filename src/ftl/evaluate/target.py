"""Evaluate a target, what `ftl eval TARGET` runs: a finished run directory (its final model, on its
validation split or given data) or any local model folder (on given data). Writes eval.json/eval.md
with the language-model loss, a few generations and the device it ran on (`--device`, default: CUDA
when present). Imported only by that command, so torch and transformers load at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftl import run_dir as layout
from ftl.config.schema import DataConfig, Recipe
from ftl.data import load_splits
from ftl.data.tokenize import encode_records
from ftl.errors import FtlError
from ftl.evaluate.device import eval_device, model_device, place
from ftl.evaluate.generate import generate_samples, sample_prompts
from ftl.evaluate.lm import lm_loss
from ftl.evaluate.report import write_report
from ftl.models.trained import load_trained_causal_lm

SUFFIX_KIND = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = get_args(DataConfig.model_fields["format"].annotation)


def check_format(fmt: str | None, data: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise FtlError(f"--format {fmt}: not a record format; one of {', '.join(FORMATS)}")
    if fmt and not data:
        raise FtlError("--format describes --data: give both (a run directory alone uses its own data)")


def data_config_for_file(path: str, fmt: str, like: DataConfig | None) -> DataConfig:
    p = Path(path)
    kind = SUFFIX_KIND.get(p.suffix) or ("saved_dataset" if p.is_dir() else None)
    if kind is None:
        raise FtlError(f"--data {path}: expected a .jsonl, .json, .csv, .parquet file or a saved dataset folder")
    base = like.model_dump() if like else {"format": fmt}
    base.update(source={"kind": kind, "path": str(p)}, sources=None, splits=None, format=fmt or base["format"],
                split={"validation": 0.0, "test": 0.0, "seed": 0}, limit=None)
    return DataConfig.model_validate(base)


def evaluate_target(target: str, data: str | None = None, fmt: str | None = None, split: str = "validation",
                    out: str | None = None, max_new_tokens: int = 24, samples: int = 3, device: str = "auto") -> dict:
    check_format(fmt, data)  # before a model loads
    wanted = eval_device(device, torch.cuda.is_available())
    path = Path(target)
    if (path / layout.RECIPE_FILE).exists():
        model, tokenizer, recipe = load_trained_causal_lm(path)
        data_cfg = data_config_for_file(data, fmt, recipe.data) if data else recipe.data
    elif (path / "config.json").exists():
        if not (data and fmt):
            raise FtlError(f"{target} is a model folder: give --data FILE and --format FORMAT")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        data_cfg = data_config_for_file(data, fmt, None)
        recipe = Recipe.model_validate({"name": path.name, "data": data_cfg.model_dump()})
    else:
        raise FtlError(f"{target}: neither a run directory (no {layout.RECIPE_FILE}) nor a model folder "
                       "(no config.json)")
    model = place(model, wanted)  # a 4/8-bit model stays on the device bitsandbytes loaded it on
    splits, _ = load_splits(data_cfg) if data else load_splits(recipe.data)
    records = splits.train if data else getattr(splits, split)[: recipe.eval.max_examples]
    recipe = recipe.model_copy(update={"data": data_cfg})
    features = encode_records(tokenizer, records, data_cfg)
    metrics = lm_loss(model, features, tokenizer.pad_token_id, recipe.eval.batch_size)
    prompts = sample_prompts(tokenizer, recipe.eval.generate, data_cfg.system_prompt,
                             records)[: len(recipe.eval.generate.prompts) + samples]
    metrics["samples"] = generate_samples(model, tokenizer, prompts, max_new_tokens)
    metrics["examples"] = len(features)
    metrics["device"] = str(model_device(model))
    json_path, md_path = write_report(Path(out) if out else path / "eval", {"eval": metrics})
    print(md_path.read_text())
    print(f"ftl: wrote {json_path} and {md_path}")
    return metrics
