"""What the TRL-backed stages (dpo, grpo) share: training arguments from the recipe, metrics into
metrics.jsonl, resume from TRL's own checkpoints. Their reward and the end-of-run comparison with the
reference are ftl.rl's, as PPO's are."""

from __future__ import annotations

from pathlib import Path

from ftl import run_dir as layout
from ftl.config.schema import Recipe


def trainer_arguments(recipe: Recipe, run_dir: Path, main: bool) -> dict:
    t = recipe.train
    return dict(
        output_dir=str(run_dir / layout.TRL_DIR), max_steps=t.max_steps or -1, num_train_epochs=t.epochs,
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=recipe.eval.batch_size,
        gradient_accumulation_steps=t.grad_accum, learning_rate=t.lr, lr_scheduler_type=t.scheduler,
        warmup_steps=t.warmup_steps, weight_decay=t.weight_decay, max_grad_norm=t.grad_clip or 0.0,
        use_cpu=recipe.launch.device == "cpu", bf16=t.precision == "bf16", fp16=t.precision == "fp16",
        gradient_checkpointing=recipe.model.gradient_checkpointing, report_to=[], logging_steps=t.log_every,
        save_strategy="steps" if t.save_every else "no", save_steps=t.save_every or 500,
        save_total_limit=t.keep_checkpoints, seed=t.seed, disable_tqdm=not main)


def last_trl_checkpoint(run_dir: Path, resume: bool):
    checkpoints = sorted((run_dir / layout.TRL_DIR).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return str(checkpoints[-1]) if resume and checkpoints else None


def metrics_callback(log):
    from transformers import TrainerCallback

    class ToMetricsLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero and "loss" in logs:
                log({"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))},
                     "lr": logs.get("learning_rate", 0.0)})
    return ToMetricsLog()
