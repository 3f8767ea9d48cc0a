"""Runs TRL 1.12's PPOTrainer (trl.experimental.ppo) for bench/ppo_vs_trl.py, in its own process with TRL 1.12
first on sys.path (the project's TRL 1.16 has no PPO). Usage: python trl_ppo_runner.py CONFIG.json OUT.json

Instrumentation only, no change to TRL's loop: the module's `batch_generation` (the rollout's generate call) and
`gc.collect` (called twice per step) are wrapped to time them; a callback stamps each step's end.
Shims for transformers 5.23 / accelerate 1.15: none needed (see SHIMS, reported in the result).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import types

SHIMS: list[str] = []


def main(config_path: str, out_path: str) -> None:
    cfg = json.loads(open(config_path).read())
    sys.path.insert(0, cfg["trl_dir"])
    started = time.perf_counter()
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    assert trl.__version__ == "1.12.0" and trl.__file__.startswith(cfg["trl_dir"]), (trl.__version__, trl.__file__)
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(cfg["seed"])
    generation_calls, gc_calls, response_tokens = [], [], []

    real_generation = ppo_module.batch_generation

    def timed_generation(model, queries, *args, **kwargs):
        t = time.perf_counter()
        query_responses, logits = real_generation(model, queries, *args, **kwargs)
        generation_calls.append((t, time.perf_counter() - t))
        response = query_responses[:, queries.shape[1]:]
        is_eos = response == tokenizer.eos_token_id
        # tokens up to and including the first EOS (the whole response without one), as ftl counts them
        lengths = torch.where(is_eos.any(-1), is_eos.int().argmax(-1) + 1, response.shape[1])
        response_tokens.append(lengths.float().mean().item())
        return query_responses, logits

    real_gc = ppo_module.gc

    def timed_collect(*args):
        t = time.perf_counter()
        n = real_gc.collect(*args)
        gc_calls.append((t, time.perf_counter() - t))
        return n

    ppo_module.batch_generation = timed_generation
    ppo_module.gc = types.SimpleNamespace(collect=timed_collect)

    tokenizer = AutoTokenizer.from_pretrained(cfg["policy"])
    tokenizer.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in open(cfg["prompts"])]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False).input_ids for t in texts]})

    policy = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    peft_config = None
    if cfg["method"] == "lora":
        from peft import LoraConfig
        ref = None  # TRL's convention with peft: the adapter-disabled policy is the reference
        peft_config = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        ref = AutoModelForCausalLM.from_pretrained(cfg["policy"])
    # TRL's examples initialise the value model from the reward model
    reward = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(cfg["reward"], num_labels=1)

    args = PPOConfig(
        output_dir=cfg["output_dir"], per_device_train_batch_size=cfg["rollout_batch"], gradient_accumulation_steps=1,
        num_mini_batches=cfg["rollout_batch"] // cfg["mini_batch"], num_ppo_epochs=cfg["ppo_epochs"],
        total_episodes=cfg["steps"] * cfg["rollout_batch"], local_rollout_forward_batch_size=cfg["rollout_batch"],
        response_length=cfg["max_new_tokens"], stop_token="eos", temperature=cfg["temperature"],
        missing_eos_penalty=None, kl_coef=cfg["kl_coef"], kl_estimator="k1", learning_rate=cfg["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, seed=cfg["seed"], num_sample_generations=0,
        bf16=cfg["precision"] == "bf16", fp16=False, use_cpu=True, gradient_checkpointing=False, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
    )

    step_ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tokenizer, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=dataset, value_model=value, eval_dataset=dataset.select(range(8)),
                         peft_config=peft_config, callbacks=[StepClock()])
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    logs = [h for h in trainer.state.log_history if "objective/scores" in h]
    result = {
        "trl_version": trl.__version__, "shims": SHIMS, "setup_seconds": train_started - started,
        "train_seconds": train_seconds, "step_ends": step_ends, "generation_calls": generation_calls,
        "gc_calls": gc_calls, "response_tokens": response_tokens, "episodes_per_step": args.batch_size,
        "mini_batch_size": args.mini_batch_size, "optimizer_steps_per_step": args.num_ppo_epochs * args.num_mini_batches,
        "scores": [h["objective/scores"] for h in logs], "kl": [h["objective/kl"] for h in logs],
        "lr": [h["lr"] for h in logs],
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    open(out_path, "w").write(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
