"""How `ftl eval` evaluates each stage's output: one row per stage, naming the kind of model the stage
produces, the record formats that kind can be scored on, and the function that scores it.

    language model   sft, upft (and QAT)   loss, perplexity and greedy generations
    classifier       classify              accuracy, macro precision/recall/F1, confusion matrix
    reward model     reward                pairwise accuracy, mean margin, Bradley-Terry loss
    policy           ppo, dpo, grpo        reward and win rate against the model the run started from

Each scoring function uses the same measuring code as the stage's own end-of-run evaluation, so the
same rows (and seeds) give the same numbers. A test ties the rows to the stage table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ftl.config.schema import Recipe
from ftl.config.stages import LM_FORMATS, PROMPT_FORMATS
from ftl.data.tokenize import encode_records
from ftl.errors import FtlError
from ftl.evaluate.classification import classify_metrics, encode_texts
from ftl.evaluate.device import model_device
from ftl.evaluate.generate import generate_samples, sample_prompts
from ftl.evaluate.lm import lm_loss
from ftl.evaluate.pairwise import encode_pairs, pairwise_metrics
from ftl.evaluate.target_models import label_names, load_causal_lm, load_sequence_classifier
from ftl.models.load import base_model_dir
from ftl.rl.compare import compare_with_initial
from ftl.rl.reward import load_reward


@dataclass
class EvalJob:
    path: Path              # the run directory or model folder
    is_run: bool
    recipe: Recipe          # the run's (or one made for a folder); its data section describes `records`
    records: list[dict]
    source: str             # where the records come from (a file, or the run's split), for messages
    device: torch.device
    max_new_tokens: int
    samples: int
    also: dict[str, Recipe] = field(default_factory=dict)  # a policy's responses also scored by these recipes' rewards


def evaluate_lm(job: EvalJob) -> dict:
    model, tokenizer = load_causal_lm(job.path, job.is_run, job.device)
    data, generate = job.recipe.data, job.recipe.eval.generate
    metrics = {"examples": len(job.records)}
    if data.format != "prompts":  # bare prompts have no text to predict: generations only
        features = encode_records(tokenizer, job.records, data)  # drops examples with nothing to predict
        metrics = {**lm_loss(model, features, tokenizer.pad_token_id, job.recipe.eval.batch_size,
                             chunk_tokens=job.recipe.train.loss_chunk_tokens),
                   "examples": len(features)}
    prompts = sample_prompts(tokenizer, generate, data.system_prompt, job.records)
    prompts = prompts[: len(generate.prompts) + job.samples]  # the fixed prompts, then a few of the records'
    metrics["samples"] = generate_samples(model, tokenizer, prompts, job.max_new_tokens)
    return {**metrics, "device": str(model_device(model))}


def evaluate_classifier(job: EvalJob) -> dict:
    names = label_names(job.path, job.is_run)
    model, tokenizer = load_sequence_classifier(job.path, job.recipe if job.is_run else None, len(names), job.device)
    features = encode_texts(tokenizer, job.records, names, job.recipe.data.max_length, job.source)
    metrics = classify_metrics(model, features, names, tokenizer.pad_token_id, job.recipe.eval.batch_size)
    return {**metrics, "device": str(model_device(model))}


def evaluate_reward_model(job: EvalJob) -> dict:
    model, tokenizer = load_sequence_classifier(job.path, job.recipe if job.is_run else None, 1, job.device)
    features = encode_pairs(tokenizer, job.records, job.recipe)
    metrics = pairwise_metrics(model, features, tokenizer.pad_token_id, job.recipe.eval.batch_size)
    return {**metrics, "device": str(model_device(model))}


def evaluate_policy(job: EvalJob) -> dict:
    """The trained policy against the model the run started from (PPO's reference is that model, or it with
    the adapter off), sampled from the same seed and scored by the run's `reward:`, as the run's own end did."""
    recipe = job.recipe
    if recipe.reward is None:
        raise FtlError(f"{job.path}: a '{recipe.stage}' run without a 'reward' section: nothing scores its "
                       "responses (ftl eval rates a policy with the run's reward model or function)")
    policy, tokenizer = load_causal_lm(job.path, True, job.device)
    device = model_device(policy)
    start = base_model_dir(recipe.model, tokenizer, recipe.train.seed, job.path)
    metrics = compare_with_initial(device, policy, start, tokenizer, recipe, job.records, load_reward(recipe, device),
                                   also={name: load_reward(other, device) for name, other in job.also.items()})
    return {**metrics, "device": str(device)}


@dataclass(frozen=True)
class EvalKind:
    name: str                          # what eval.json calls it
    formats: tuple[str, ...]           # record formats it scores; a lone one is a model folder's default
    describe: str                      # the formats as an error names them
    evaluate: Callable[[EvalJob], dict]


LANGUAGE_MODEL = EvalKind("language_model", LM_FORMATS + ("prompts",),
                          "text, chat, prompt_completion (loss and generations) or prompts (generations)",
                          evaluate_lm)
CLASSIFIER = EvalKind("classifier", ("classification",), "'classification' (text, label)", evaluate_classifier)
REWARD_MODEL = EvalKind("reward_model", ("preference",), "'preference' (prompt, chosen, rejected)",
                        evaluate_reward_model)
POLICY = EvalKind("policy", PROMPT_FORMATS + ("preference",),
                  "prompts, chat, prompt_completion or preference (rows with a prompt)", evaluate_policy)

BY_STAGE: dict[str, EvalKind] = {
    "sft": LANGUAGE_MODEL,
    "upft": LANGUAGE_MODEL,
    "classify": CLASSIFIER,
    "reward": REWARD_MODEL,
    "ppo": POLICY,
    "dpo": POLICY,
    "grpo": POLICY,
}
