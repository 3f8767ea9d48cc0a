"""The model `ftl eval` scores, loaded as its stage saved it: a run's `final/` (an adapter goes on the run's
base) or a bare model folder, with the head the stage trained (language model or sequence classifier), on
the chosen device (a 4/8-bit model stays where bitsandbytes loaded it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from ftl import run_dir as layout
from ftl.config.schema import Recipe
from ftl.errors import FtlError
from ftl.evaluate.device import place
from ftl.methods import METHODS, load_trained
from ftl.models.load import base_model_dir, load_model
from ftl.models.trained import load_trained_causal_lm


def load_causal_lm(path: Path, is_run: bool, device: torch.device):
    """(model, tokenizer): a run's final language model, or a model folder's."""
    if is_run:
        model, tokenizer, _ = load_trained_causal_lm(path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
    return place(model, device), tokenizer


def load_sequence_classifier(path: Path, run_recipe: Recipe | None, num_labels: int, device: torch.device):
    """(model, tokenizer) of a classifier or reward model. A run's full fine-tune saved the whole classifier in
    final/; an adapter method saved only the adapter (with the trained head, PEFT's modules_to_save), so the
    base gets a fresh `num_labels`-output head first, quantised as trained. run_recipe None: a model folder."""
    folder = path / layout.FINAL_DIR if run_recipe is not None else path
    if run_recipe is not None and not folder.is_dir():
        raise FtlError(f"{path}: no '{layout.FINAL_DIR}' model (has the run finished?)")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:  # as the classify stage does: scores are read at the last real token
        tokenizer.pad_token = tokenizer.eos_token
    if run_recipe is None or run_recipe.method.kind == "full":
        model = AutoModelForSequenceClassification.from_pretrained(folder)
    else:
        method = run_recipe.method
        base = load_model(run_recipe.model, base_model_dir(run_recipe.model, tokenizer, run_recipe.train.seed, path),
                          METHODS[method.kind].quant_bits, method.quant, head="sequence_classification",
                          num_labels=num_labels)
        base.config.pad_token_id = tokenizer.pad_token_id
        model = load_trained(base, folder, method)
    model.config.pad_token_id = tokenizer.pad_token_id
    return place(model.eval(), device), tokenizer


def folder_stage(path: Path) -> str:
    """The stage whose output a bare model folder looks like: a one-output sequence classifier is a reward
    model, a k-way one a classifier, anything else a language model."""
    config = json.loads((path / "config.json").read_text())
    if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return "sft"
    outputs = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    return "reward" if outputs == 1 else "classify"


def label_names(path: Path, is_run: bool) -> list[str]:
    """Class names in id order: the classify stage's labels.json, or a folder's config id2label."""
    if is_run:
        labels = path / layout.LABELS_FILE
        if not labels.exists():
            raise FtlError(f"{path}: no {layout.LABELS_FILE} (the classify stage writes it when it starts)")
        return json.loads(labels.read_text())
    id2label = json.loads((path / "config.json").read_text()).get("id2label") or {}
    return [id2label[k] for k in sorted(id2label, key=int)]
