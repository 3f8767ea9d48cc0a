"""Supervised fine-tuning of a causal LM: chat, prompt/completion or plain text, packed or not.

With method.qat, the end of the run converts the model to real integer weights and compares it with
post-training quantisation of a plain fine-tune (ftl.stages.sft_qat)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ftl.config.schema import Recipe
from ftl.data.packing import collate
from ftl.data.tokenize import EncodeReport, encode_records
from ftl.evaluate.generate import generate_samples, sample_prompts
from ftl.evaluate.lm import causal_lm_loss, lm_loss
from ftl.stages.session import RunSession, longest
from ftl.stages.sft_qat import compare_qat


def run_sft(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()
    encoding = EncodeReport()  # truncated / dropped training examples, for the manifest
    train = encode_records(tokenizer, splits.train, recipe.data, encoding)
    validation = encode_records(tokenizer, session.validation_records(splits), recipe.data)
    test = encode_records(tokenizer, session.test_records(splits), recipe.data)
    rows = session.training_rows(train, encoding=encoding)
    session.note_lengths(eval=longest(validation + test))  # what evaluation's batches are planned at
    model = session.prepare_model(tokenizer)
    evaluate = lm_evaluation(session, tokenizer, validation, splits.validation)

    model, result = session.fit(model, tokenizer, rows, partial(collate, pad_id=tokenizer.pad_token_id),
                                partial(causal_lm_loss, chunk_tokens=recipe.train.loss_chunk_tokens), evaluate,
                                evaluate_before=partial(evaluate, with_samples=True))
    summary = session.finish(model, tokenizer, result,
                             lambda: {**evaluate(model, with_samples=True), **test_loss(session, model, tokenizer, test)})
    if recipe.method.qat.enabled and not result.interrupted:  # convert, save quantized/, compare with PTQ
        summary["qat"] = compare_qat(recipe, run_dir, session.accelerator, resume, validation=validation)
    return summary


def lm_evaluation(session: RunSession, tokenizer, validation: list[dict], prompt_records: list[dict]):
    """evaluate(model, with_samples=False): validation loss/perplexity, plus greedy generations on the
    eval.generate prompts when asked (before and after training)."""
    recipe, acc = session.recipe, session.accelerator
    prompts = sample_prompts(tokenizer, recipe.eval.generate, recipe.data.system_prompt, prompt_records)

    def evaluate(model, with_samples: bool = False) -> dict:
        metrics = lm_loss(model, validation, tokenizer.pad_token_id, recipe.eval.batch_size, acc,
                          recipe.train.loss_chunk_tokens) \
            if validation else {}
        if with_samples and prompts:
            metrics["samples"] = generate_samples(acc.unwrap_model(model), tokenizer, prompts,
                                                  recipe.eval.generate.max_new_tokens)
        return metrics
    return evaluate


def test_loss(session: RunSession, model, tokenizer, test: list[dict]) -> dict:
    """The test split's loss and perplexity, at the end of the run only (as `after.test`)."""
    if not test:
        return {}
    recipe = session.recipe
    return {"test": lm_loss(model, test, tokenizer.pad_token_id, recipe.eval.batch_size, session.accelerator,
                            recipe.train.loss_chunk_tokens)}
