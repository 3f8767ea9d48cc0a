"""Supervised fine-tuning of a causal LM: chat, prompt/completion or plain text, packed or not."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from ftl.config.schema import Recipe
from ftl.data.packing import collate, pack_sequences
from ftl.data.tokenize import encode_records
from ftl.evaluate.lm import causal_lm_loss, lm_loss
from ftl.evaluate.generate import generate_samples, sample_prompts
from ftl.methods import PACKING_INCOMPATIBLE, QUANT_BITS
from ftl.models.load import load_model
from ftl.stages.session import RunSession
from ftl.train.loop import fit


def run_sft(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    session = RunSession(recipe, run_dir, resume)
    acc = session.accelerator
    splits = session.load_data()
    tokenizer = session.tokenizer(splits.train)

    train = encode_records(tokenizer, splits.train, recipe.data)
    validation = encode_records(tokenizer, splits.validation[: recipe.eval.max_examples], recipe.data)
    packing = recipe.data.packing and recipe.method.kind not in PACKING_INCOMPATIBLE
    if recipe.data.packing and not packing and acc.is_main_process:
        print(f"ftl: method {recipe.method.kind} puts virtual tokens at the start of each row: "
              "training without packing", flush=True)
    train_rows = pack_sequences(train, recipe.data.max_length) if packing else train
    session.note_data(examples=len(train), rows=len(train_rows), packed=packing)

    base = load_model(recipe.model, session.base_dir(tokenizer), QUANT_BITS.get(recipe.method.kind),
                          recipe.method.quant)
    model = session.apply_method(base)
    prompts = sample_prompts(tokenizer, recipe.eval.generate, recipe.data.system_prompt, splits.validation)

    def evaluate(m, with_samples=False) -> dict:
        metrics = lm_loss(m, validation, tokenizer.pad_token_id, recipe.eval.batch_size, acc) if validation else {}
        if with_samples and prompts:
            metrics["samples"] = generate_samples(acc.unwrap_model(m), tokenizer, prompts,
                                                  recipe.eval.generate.max_new_tokens)
        return metrics

    model, result = fit(accelerator=acc, model=model, cfg=recipe.train, features=train_rows,
                        collate=partial(collate, pad_id=tokenizer.pad_token_id), loss_fn=causal_lm_loss,
                        run_dir=run_dir, log=session.log, resume=resume,
                        before_training=session.evaluation_before(lambda m: evaluate(m, with_samples=True)),
                        evaluate=evaluate, eval_every=recipe.eval.every, save_model=session.model_saver(tokenizer))
    summary = session.finish(model, tokenizer, result, lambda: evaluate(model, with_samples=True))
    if recipe.method.qat.enabled and not result.interrupted:  # convert, save quantized/, compare with PTQ
        from ftl.evaluate.qat_report import compare_qat

        summary["qat"] = compare_qat(recipe, run_dir, acc, resume, validation=validation)
    return summary
