"""`ftl plan`'s predicted peak vs the peak each run measured in its own process (CPU: resident-set
high-water mark), on the tiny and small profiles of recipes/sft_chat.yaml (full, LoRA, QLoRA, and LoRA with
gradient checkpointing forced on), recipes/classify*.yaml and the PPO stage (recipes/rlhf/ppo.yaml).

Each configuration runs in its own process (`python -m ftl run ... train.max_steps=3`: the peak is reached in
the first steps and the evaluations around them). Two predictions per run, both made before it starts:
- planned: `ftl plan RECIPE --data`, the plan for the recipe's own data (its longest training row, evaluation
  example and prompt, read and tokenised as the stage will); the goal is within 15% of the measured peak.
  The run records its own plan (from the rows it built) in its manifest too (`memory.planned`);
- bound: `ftl plan RECIPE`, every row at data.max_length (an upper bound where rows are not packed to it).
PPO runs from a policy folder and a reward-model folder built here (SmolLM2-135M, or a tiny Llama with a
tokenizer trained on the prompts), as the RLHF pipeline would hand them over.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
STEPS = 3
GOAL = 0.15

SFT, PPO = RECIPES / "sft_chat.yaml", RECIPES / "rlhf" / "ppo.yaml"
# name, recipe, profile, overrides (beside train.max_steps and train.save_every)
CONFIGS = [
    ("sft_chat tiny full", SFT, "tiny", []),
    ("sft_chat tiny lora", SFT, "tiny", ["method.kind=lora"]),
    ("sft_chat tiny qlora", SFT, "tiny", ["method.kind=qlora"]),
    ("sft_chat small full", SFT, "small", ["method.kind=full"]),
    ("sft_chat small lora", SFT, "small", []),
    ("sft_chat small qlora", SFT, "small", ["method.kind=qlora"]),
    ("sft_chat small lora, checkpointing on", SFT, "small", ["model.gradient_checkpointing=true"]),
    ("classify_topic tiny", RECIPES / "classify_topic.yaml", "tiny", []),
    ("classify_topic small", RECIPES / "classify_topic.yaml", "small", ["eval.max_examples=64"]),
    ("classify_sentiment_zh tiny", RECIPES / "classify_sentiment_zh.yaml", "tiny", []),
    ("classify_sentiment_zh small", RECIPES / "classify_sentiment_zh.yaml", "small", ["eval.max_examples=64"]),
    ("classify_topic_smollm2 tiny", RECIPES / "classify_topic_smollm2.yaml", "tiny", []),
    ("classify_topic_smollm2 small", RECIPES / "classify_topic_smollm2.yaml", "small", ["eval.max_examples=64"]),
    ("ppo tiny", PPO, "tiny", ["train.max_steps=2"]),
    ("ppo small", PPO, "small", ["train.max_steps=2"]),
]


def ppo_models(folder: Path, profile: str) -> list[str]:
    """A policy folder and a reward-model folder (the pipeline's SFT and reward outputs) for the PPO runs."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftl.config.schema import ModelConfig, TinyModelConfig
    from ftl.models.load import load_tokenizer, pretrained_dir
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    policy, reward = folder / f"policy-{profile}", folder / f"reward-{profile}"
    if profile == "small":
        policy_dir = pretrained_dir(ModelConfig(source="smollm2"))
        tokenizer = load_tokenizer(ModelConfig(source="smollm2"))
        head = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    else:
        from ftl.config import load_recipe
        from ftl.data import load_splits
        from ftl.models.load import record_texts

        splits, _ = load_splits(load_recipe(PPO, "tiny").data)
        tokenizer = train_tiny_tokenizer(record_texts(splits.train), TinyModelConfig().vocab_size)
        model = build_tiny_model(TinyModelConfig(), tokenizer, seed=0)
        model.save_pretrained(policy)
        tokenizer.save_pretrained(policy)
        policy_dir = policy
        head = AutoModelForSequenceClassification.from_pretrained(policy, num_labels=1)
    head.config.pad_token_id = tokenizer.pad_token_id
    head.save_pretrained(reward)
    tokenizer.save_pretrained(reward)
    return [f"model.path={policy_dir}", f"reward.path={reward}"]


def run_one(name: str, recipe: Path, profile: str, overrides: list[str], out: Path) -> dict:
    from ftl.config import load_recipe
    from ftl.plan import data_lengths, make_plan

    run_dir = out / name.replace(" ", "_").replace(",", "")
    overrides = [f"train.max_steps={STEPS}", "train.save_every=null", *overrides, f"track.output_dir={run_dir}"]
    resolved = load_recipe(recipe, profile, overrides)
    bound = make_plan(resolved)  # `ftl plan` before anything runs
    lengths = data_lengths(resolved)
    planned = make_plan(resolved, lengths=lengths)  # `ftl plan --data`
    argv = [sys.executable, "-m", "ftl", "run", str(recipe), "--profile", profile, "--overwrite", *overrides]
    started = time.time()
    proc = subprocess.run(argv, cwd=out, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
                               "WANDB_MODE": "disabled"})
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    memory, choice = manifest["memory"], manifest["gradient_checkpointing"]
    measured = memory["peak_bytes"]
    marks = memory["per_rank"][memory["peak_rank"]]["marks"]
    return {"name": name, "recipe": str(recipe.relative_to(ROOT)), "profile": profile, "overrides": overrides[:-1],
            "measured_bytes": measured, "planned_bytes": round(planned.chosen.peak),
            "error": planned.chosen.peak / measured - 1, "bound_bytes": round(bound.chosen.peak),
            "bound_error": bound.chosen.peak / measured - 1,
            "run_planned_bytes": memory["planned"].get("peak_bytes"),  # the run's own plan, from its rows
            "baseline_bytes": memory["baseline_bytes"], "marks": {k: v for k, v in marks.items()},
            "lengths": {"data": {k: v for k, v in vars(lengths).items()}, "run": memory["planned"].get("lengths")},
            "terms": {k: round(v) for k, v in planned.chosen.as_dict().items() if isinstance(v, (int, float))},
            "checkpointing": choice["on"], "checkpointing_reason": choice["reason"],
            "planned_checkpointing": planned.checkpointing.on, "seconds": round(time.time() - started, 1)}


def table(rows: list[dict]) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| run | checkpointing | measured peak GiB | `ftl plan --data` GiB | error | `ftl plan` (bound) GiB "
             "| bound error |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {'on' if r['checkpointing'] else 'off'} | {gib(r['measured_bytes'])} | "
                     f"{gib(r['planned_bytes'])} | {100 * r['error']:+.1f}% | {gib(r['bound_bytes'])} | "
                     f"{100 * r['bound_error']:+.1f}% |")
    return "\n".join(lines)


def main(names=None) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        extra = {}
        for name, recipe, profile, overrides in CONFIGS:
            if names and name not in names:
                continue
            if recipe == PPO and profile not in extra:
                extra[profile] = ppo_models(out, profile)
            models = extra[profile] if recipe == PPO else []
            row = run_one(name, recipe, profile, overrides + models, out)
            rows.append(row)
            print(f"plan_accuracy: {name}: measured {row['measured_bytes'] / 2**30:.2f} GiB, planned "
                  f"{row['planned_bytes'] / 2**30:.2f} GiB ({100 * row['error']:+.1f}%), bound "
                  f"{row['bound_bytes'] / 2**30:.2f} GiB ({100 * row['bound_error']:+.1f}%), {row['seconds']} s",
                  flush=True)
    worst = max(abs(r["error"]) for r in rows)
    print(table(rows))
    print(f"max relative error of the plan: {100 * worst:.1f}% (goal {100 * GOAL:.0f}%)")
    return {"name": "plan_accuracy", "steps": STEPS, "goal": GOAL, "runs": rows, "max_abs_error": worst,
            "max_abs_bound_error": max(abs(r["bound_error"]) for r in rows),
            "measure": "host RSS high-water (VmHWM) of the run's process"}


if __name__ == "__main__":  # `python bench/plan_accuracy.py [NAME ...]`: some configurations, printed only
    print(json.dumps(main(sys.argv[1:] or None), indent=1))
