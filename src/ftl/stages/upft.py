"""UPFT: unsupervised prefix fine-tuning (Ji et al. 2025, "The First Few Tokens Are All You Need").

The initial model samples responses to unlabelled prompts once; training is the shared loop on their
first `upft.prefix_tokens` tokens. The full spec (sampling, samples file, ranks, evaluation) is in the
README, section "Unsupervised prefix fine-tuning (UPFT)".
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from functools import partial
from pathlib import Path

import torch

from accelerate.utils import gather_object, set_seed

from ftl import run_dir as layout
from ftl.config.schema import Recipe, UPFTOptions
from ftl.data.packing import collate
from ftl.data.tokenize import IGNORE, count_trained_tokens, encode_records, generation_prompt
from ftl.errors import RecipeError
from ftl.evaluate.generate import generate_samples, sample_prompts
from ftl.evaluate.lm import causal_lm_loss, lm_loss
from ftl.evaluate.sharded import batches_per_rank
from ftl.methods import METHODS
from ftl.models.load import load_model, without_zero_init
from ftl.rl.rollout import Responses, sample_responses as sample_batch
from ftl.stages.session import RunSession
from ftl.train.distributed import is_sharded

SAMPLES_FILE, META_FILE = layout.UPFT_SAMPLES_FILE, layout.UPFT_META_FILE
SAMPLING_KEYS = ("samples_per_prompt", "max_new_tokens", "temperature", "top_k", "full_fraction")


# -- encoding -----------------------------------------------------------------------------------
def encode_upft(tokenizer, prompt: str, response_ids: list[int], prefix_tokens: int, full: bool,
                max_length: int) -> dict:
    """Prompt (masked) + response; labels on the first `prefix_tokens` response tokens, or on the whole
    response when `full`. Truncated to max_length. Labels align with input_ids (IGNORE = no loss)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target = list(response_ids) if full else list(response_ids[:prefix_tokens])
    input_ids = (prompt_ids + target)[:max_length]
    labels = ([IGNORE] * len(prompt_ids) + target)[:max_length]
    return {"input_ids": input_ids, "labels": labels}


def choose_full(n: int, fraction: float, seed: int) -> set[int]:
    """Exactly round(fraction * n) of n sample positions, chosen by seed."""
    return set(random.Random(f"upft-full-{seed}").sample(range(n), round(fraction * n)))


def encode_samples(tokenizer, samples: list[dict], split: str, prefix_tokens: int, max_length: int) -> list[dict]:
    """Features of one split's samples; samples with nothing to learn (prompt fills max_length) dropped."""
    features = [encode_upft(tokenizer, s["prompt"], s["response_ids"], prefix_tokens, s["full"], max_length)
                for s in samples if s["split"] == split]
    return [f for f in features if any(t != IGNORE for t in f["labels"][1:])]


# -- sampling -----------------------------------------------------------------------------------
def sampling_jobs(tokenizer, splits, recipe: Recipe) -> tuple[list[dict], int]:
    """One job per response to draw: (split, prompt index, sample number, rendered prompt).
    Prompts that leave no room for a response within data.max_length are skipped (and counted)."""
    cfg, system = recipe.upft, recipe.data.system_prompt
    jobs, too_long = [], 0
    sources = (("train", splits.train, cfg.samples_per_prompt),
               ("validation", splits.validation[: recipe.eval.max_examples], 1))
    for split, records, per_prompt in sources:
        for index, record in enumerate(records):
            prompt = generation_prompt(tokenizer, record, system)[0]
            if len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) >= recipe.data.max_length - 1:
                too_long += 1
                continue
            jobs += [{"split": split, "prompt_index": index, "sample": j, "prompt": prompt} for j in range(per_prompt)]
    return jobs, too_long


@torch.no_grad()
def sample_responses(model, tokenizer, jobs: list[dict], cfg: UPFTOptions, seed: int, batch_size: int,
                     rank: int = 0, world: int = 1, device=None, progress: bool = False,
                     synced_gpus: bool | None = None) -> list[dict]:
    """This rank's share of the jobs, answered. Batch b (jobs b*batch_size ...) runs on rank b % world,
    seeded by (seed, b): the same samples for any world size. Every rank makes the same number of
    generate calls (one out of batches answers a dummy batch and drops it): under synced_gpus each call
    decodes until every rank is done, so a rank with a call fewer would leave the others waiting."""
    was_training = model.training
    device = device or next(model.parameters()).device
    # ceil(ceil(n / world) / size) == ceil(ceil(n / size) / world): rounds of one batch per rank
    rounds = range(batches_per_rank(len(jobs), world, batch_size))
    if progress:
        from tqdm.auto import tqdm

        rounds = tqdm(rounds, desc="upft sample", unit="batch", dynamic_ncols=True)
    done = []
    for r in rounds:
        b = r * world + rank
        chunk = jobs[b * batch_size:(b + 1) * batch_size]
        torch.manual_seed(seed * 1_000_003 + b)
        answered = sample_batch(model, tokenizer, [j["prompt"] for j in (chunk or jobs[:1])], cfg, device,
                                synced_gpus)
        done += answers(tokenizer, chunk, answered)  # a dummy batch has no jobs: nothing kept
    model.train(was_training)
    return done


def answers(tokenizer, chunk: list[dict], r: Responses) -> list[dict]:
    """The jobs with their sampled response ids (up to and including the first EOS) and text."""
    response, mask = r.sequences[:, r.prompt_length:].cpu(), r.mask.cpu().bool()
    done = []
    for job, row, keep, eos in zip(chunk, response, mask, r.has_eos):
        ids = row[keep].tolist()
        done.append({**job, "response": tokenizer.decode(ids, skip_special_tokens=True), "response_ids": ids,
                     "eos": bool(eos)})
    return done


def sampling_settings(recipe: Recipe) -> dict:
    return {**{k: getattr(recipe.upft, k) for k in SAMPLING_KEYS}, "seed": recipe.train.seed,
            "max_length": recipe.data.max_length, "validation_prompts": recipe.eval.max_examples}


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_samples(run_dir: Path, samples: list[dict], settings: dict, seconds: float, skipped: int) -> None:
    path = run_dir / SAMPLES_FILE
    tmp = layout.partial(path)
    with tmp.open("w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    meta = {"settings": settings, "count": len(samples), "skipped_long_prompts": skipped,
            "sampling_seconds": round(seconds, 2), "sha256": file_digest(tmp)}
    (run_dir / META_FILE).write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)  # last: a complete samples file always has its meta beside it


def read_samples(run_dir: Path) -> tuple[list[dict], dict]:
    path = run_dir / SAMPLES_FILE
    samples = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return samples, json.loads((run_dir / META_FILE).read_text())


def saved_samples_usable(run_dir: Path, recipe: Recipe) -> bool:
    """A resumed run reuses its samples; sampling settings changed since then are an error, not a resample."""
    if not ((run_dir / SAMPLES_FILE).exists() and (run_dir / META_FILE).exists()):
        return False
    saved = json.loads((run_dir / META_FILE).read_text())["settings"]
    changed = {k: (saved.get(k), v) for k, v in sampling_settings(recipe).items() if saved.get(k) != v}
    if changed:
        raise RecipeError(f"--resume: the saved UPFT samples ({run_dir / SAMPLES_FILE}) were drawn with other "
                          f"settings {changed} (saved, now); resume with the original recipe or start afresh")
    return True


def draw_samples(session: RunSession, base, tokenizer, splits) -> None:
    """Sample on every rank (each its share of the batches), gather, write on rank 0."""
    recipe = session.recipe
    acc, cfg = session.accelerator, recipe.upft
    jobs, too_long = sampling_jobs(tokenizer, splits, recipe)
    if acc.is_main_process:  # a fresh run in a used directory: never leave the old samples to be resumed
        for name in (SAMPLES_FILE, META_FILE):
            (session.run_dir / name).unlink(missing_ok=True)
    sampler = base
    if is_sharded(acc):  # ZeRO-3 partitions the base on load: sample with a whole copy on every rank
        with without_zero_init():
            sampler = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}),
                                 session.base_dir(tokenizer))
    if METHODS[recipe.method.kind].quant_bits is None:
        sampler.to(acc.device)
    started = time.perf_counter()
    # the sampler is whole on every rank: no rank needs another's decoding steps (transformers would
    # otherwise sync them under ZeRO-3)
    mine = sample_responses(sampler, tokenizer, jobs, cfg, recipe.train.seed, recipe.eval.batch_size,
                            acc.process_index, acc.num_processes, acc.device, progress=acc.is_main_process,
                            synced_gpus=False)
    everything = gather_object(mine) if acc.num_processes > 1 else mine
    seconds = time.perf_counter() - started
    if sampler is not base:
        del sampler
    order = {(j["split"], j["prompt_index"], j["sample"]): n for n, j in enumerate(jobs)}
    everything = sorted(everything, key=lambda s: order[(s["split"], s["prompt_index"], s["sample"])])
    train_positions = [n for n, s in enumerate(everything) if s["split"] == "train"]
    full = {train_positions[i] for i in choose_full(len(train_positions), cfg.full_fraction, recipe.train.seed)}
    for n, sample in enumerate(everything):
        sample["full"] = n in full
    if acc.is_main_process:
        write_samples(session.run_dir, everything, sampling_settings(recipe), seconds, too_long)
        prompts = len({(j["split"], j["prompt_index"]) for j in jobs})
        print(f"ftl: upft: sampled {len(everything)} responses to {prompts} prompts in {seconds:.1f} s on "
              f"{acc.num_processes} rank(s) -> {session.run_dir / SAMPLES_FILE}", flush=True)
    acc.wait_for_everyone()


def sample_summary(samples: list[dict], meta: dict, sha256: str, reused: bool) -> dict:
    """Manifest counts; sha256 is the file as read (a hand-edited file shows up here, not in the meta)."""
    train = [s for s in samples if s["split"] == "train"]
    lengths = [len(s["response_ids"]) for s in train]
    return {"samples_file": SAMPLES_FILE, "reused": reused, "sha256": sha256,
            "sampling_seconds": meta["sampling_seconds"], "settings": meta["settings"],
            "skipped_long_prompts": meta["skipped_long_prompts"],
            "train_samples": len(train), "full_samples": sum(s["full"] for s in train),
            "prefix_samples": sum(not s["full"] for s in train),
            "validation_samples": sum(s["split"] == "validation" for s in samples),
            "eos_fraction": sum(s["eos"] for s in train) / max(1, len(train)),
            "mean_response_tokens": sum(lengths) / max(1, len(lengths))}


# -- the stage ----------------------------------------------------------------------------------
def run_upft(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()
    base = session.load_base(tokenizer)
    samples, sampled = own_samples(session, base, tokenizer, splits)
    train = encode_samples(tokenizer, samples, "train", recipe.upft.prefix_tokens, recipe.data.max_length)
    held_out = encode_samples(tokenizer, samples, "validation", recipe.upft.prefix_tokens, recipe.data.max_length)
    rows = session.training_rows(train)
    session.record("upft", {**sampled, "train_features": len(train), "trained_tokens": count_trained_tokens(train)})
    model = session.apply_method(base)
    evaluate = upft_evaluation(session, tokenizer, held_out, splits)

    model, result = session.fit(model, tokenizer, rows, partial(collate, pad_id=tokenizer.pad_token_id),
                                partial(causal_lm_loss, chunk_tokens=recipe.train.loss_chunk_tokens), evaluate,
                                evaluate_before=partial(evaluate, with_samples=True))
    return session.finish(model, tokenizer, result, lambda: evaluate(model, with_samples=True))


def own_samples(session: RunSession, base, tokenizer, splits) -> tuple[list[dict], dict]:
    """(samples, their summary): the initial model's samples, drawn now or on --resume read back (never
    resampled). Training then starts from the same RNG state whether it sampled or not."""
    run_dir = session.run_dir
    reused = session.resume and saved_samples_usable(run_dir, session.recipe)
    if reused:
        session.accelerator.print(f"ftl: upft: --resume reuses the saved samples {run_dir / SAMPLES_FILE} "
                                  "(no resampling)")
    else:
        draw_samples(session, base, tokenizer, splits)
    samples, meta = read_samples(run_dir)
    set_seed(session.recipe.train.seed)
    return samples, sample_summary(samples, meta, file_digest(run_dir / SAMPLES_FILE), reused)


def upft_evaluation(session: RunSession, tokenizer, held_out: list[dict], splits):
    """evaluate(model, with_samples=False): loss on the initial model's own held-out prefixes, SFT-style
    loss on the reference answers when the format has them, greedy generations when asked."""
    recipe, acc = session.recipe, session.accelerator
    references = encode_records(tokenizer, session.validation_records(splits), recipe.data) \
        if session.record_kinds("validation") <= {"chat", "prompt_completion"} else []
    prompts = sample_prompts(tokenizer, recipe.eval.generate, recipe.data.system_prompt, splits.validation)
    chunk = recipe.train.loss_chunk_tokens

    def evaluate(model, with_samples: bool = False) -> dict:
        metrics = {}
        if held_out:
            own = lm_loss(model, held_out, tokenizer.pad_token_id, recipe.eval.batch_size, acc, chunk)
            metrics.update(self_prefix_loss=own["loss"], self_prefix_tokens=own["tokens"])
        if references:
            metrics.update(lm_loss(model, references, tokenizer.pad_token_id, recipe.eval.batch_size, acc, chunk))
        if with_samples and prompts:
            metrics["samples"] = generate_samples(acc.unwrap_model(model), tokenizer, prompts,
                                                  recipe.eval.generate.max_new_tokens)
        return metrics
    return evaluate
