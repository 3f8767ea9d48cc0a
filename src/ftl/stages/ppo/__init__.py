"""PPO (RLHF step 3) on accelerate — TRL removed its PPOTrainer in 1.13, so ftl owns this loop.

Per iteration: sample responses to a batch of prompts; score them (reward model or function) with a
per-token KL penalty to the frozen reference; GAE advantages (whitened); then several PPO epochs of
mini-batches with clipped policy and value losses. Policy and value model train together.
A LoRA policy's reference is the same model with its adapter disabled (no second copy in memory).
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ftl.config.schema import Recipe
from ftl.data.tokenize import generation_prompt
from ftl.methods import MERGEABLE, QUANT_BITS
from ftl.models.load import load_model, without_zero_init
from ftl.stages.ppo import maths
from ftl.stages.ppo.rollout import RewardFunction, Rollout, collect, response_logprobs, response_values
from ftl.stages.session import RunSession
from ftl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ftl.errors import RecipeError
from ftl.train.distributed import is_sharded
from ftl.train.loop import micro_batches
from ftl.train.signals import StopRequest


class Reference:
    """The frozen reference policy: the adapter-disabled policy for LoRA-family methods (no second copy
    in memory), else a frozen copy of the initial policy."""

    def __init__(self, accelerator, policy, method_kind: str):
        self.unwrapped = accelerator.unwrap_model(policy)
        self.kind = self.kind_for(method_kind)
        self.shares_weights = self.kind == "disabled_adapter"
        self.frozen = None if self.shares_weights else \
            copy.deepcopy(self.unwrapped).eval().requires_grad_(False)

    @classmethod
    def frozen_model(cls, model) -> "Reference":
        """A reference that is the given (already frozen) model, e.g. the initial policy of a DPO run."""
        reference = cls.__new__(cls)
        reference.unwrapped, reference.frozen = model, model.requires_grad_(False)
        reference.kind, reference.shares_weights = "copy", False
        return reference

    @staticmethod
    def kind_for(method_kind: str) -> str:
        return "disabled_adapter" if method_kind in MERGEABLE - {"ia3"} else "copy"

    @contextmanager
    def model(self):
        if self.shares_weights:
            with self.unwrapped.disable_adapter():
                yield self.unwrapped
        else:
            yield self.frozen

    def logprobs(self, sequences, mask, pos, prompt_length: int, temperature: float) -> torch.Tensor:
        with self.model() as model:
            return response_logprobs(model, sequences, mask, pos, prompt_length, temperature)


class PolicyAndValue(torch.nn.Module):
    """One module for DeepSpeed: accelerate gives one engine per model, and ZeRO-3 gathers parameters
    through hooks on every submodule, so the policy and value model are called directly."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config  # accelerate sizes DeepSpeed's "auto" buckets from hidden_size

    def forward(self, *args, **kwargs):
        raise RuntimeError("call .policy or .value")


def ppo_step(accelerator, policy, value_model, optimizer, rollout: Rollout, advantages, returns, cfg, grad_clip,
             seed: int):
    """Several epochs of clipped updates over shuffled mini-batches of one rollout; returns mean statistics."""
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "value_clip_fraction": [], "entropy": []}
    n = rollout.sequences.shape[0]
    policy.train()
    value_model.train()
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, n, cfg.mini_batch):
            idx = order[start:start + cfg.mini_batch].to(rollout.sequences.device)
            seq, mask, pos = rollout.sequences[idx], rollout.attention_mask[idx], rollout.position_ids[idx]
            resp_mask = rollout.response_mask[idx]
            logprobs, entropy = response_logprobs(policy, seq, mask, pos, rollout.prompt_length, cfg.temperature,
                                                  with_entropy=True)
            values = response_values(value_model, seq, mask, pos, rollout.prompt_length)
            pg_loss, clip_fraction = maths.policy_loss(logprobs, rollout.logprobs[idx], advantages[idx], resp_mask,
                                                       cfg.clip_range)
            vf_loss, vf_clip = maths.value_loss(values, rollout.values[idx], returns[idx], resp_mask,
                                                cfg.clip_range_value)
            loss = pg_loss + cfg.vf_coef * vf_loss
            accelerator.backward(loss)
            if grad_clip:
                accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            for key, value in (("policy_loss", pg_loss), ("value_loss", vf_loss), ("clip_fraction", clip_fraction),
                               ("value_clip_fraction", vf_clip),
                               ("entropy", maths.masked_mean(entropy.detach(), resp_mask))):
                stats[key].append(value.detach().float())
    return {k: torch.stack(v).mean() for k, v in stats.items()}


def advantages_for(rollout: Rollout, cfg):
    kl = maths.kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k1") * rollout.response_mask
    rewards = maths.token_rewards(rollout.scores, kl, rollout.response_mask, cfg.kl_coef)
    advantages, returns = maths.gae(rewards, rollout.values, rollout.response_mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = maths.whiten(advantages, rollout.response_mask)
    return advantages, returns, kl.sum(-1)


def run_ppo(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    from ftl.stages.ppo.evaluate import compare_policies

    cfg = recipe.ppo
    session = RunSession(recipe, run_dir, resume)
    acc = session.accelerator
    splits = session.load_data()
    tokenizer = session.tokenizer(splits.train)
    system = recipe.data.system_prompt
    prompts = [generation_prompt(tokenizer, r, system)[0] for r in splits.train]
    held_out = [generation_prompt(tokenizer, r, system)[0] for r in splits.validation[: recipe.eval.max_examples]]

    base_dir = session.base_dir(tokenizer)
    session.manifest_fields["ppo"] = {"reference": Reference.kind_for(recipe.method.kind), "reward": cfg.reward.kind}
    policy = session.apply_method(load_model(recipe.model, base_dir, QUANT_BITS.get(recipe.method.kind),
                                             recipe.method.quant))
    sharded = is_sharded(acc)
    if sharded and Reference.kind_for(recipe.method.kind) != "disabled_adapter":
        raise RecipeError("PPO under ZeRO-3 needs a LoRA-family policy (method.kind lora/dora/qlora): its reference "
                          "is the adapter-disabled model; a partitioned model cannot be copied")
    reward_model = None
    if cfg.reward.kind == "model":
        with without_zero_init():
            reward_model = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}),
                                      Path(cfg.reward.path), head="sequence_classification").eval()
        reward_model.requires_grad_(False)
    reward = RewardFunction(reward_model, cfg.reward.function, cfg.reward.kwargs)
    value_dir = Path(cfg.reward.path) if (cfg.value_from == "reward" and cfg.reward.kind == "model") else base_dir
    value_model = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}), value_dir,
                             head="sequence_classification")
    value_model.config.pad_token_id = tokenizer.pad_token_id

    train_cfg = recipe.train
    params = [p for p in list(policy.parameters()) + list(value_model.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                                  betas=tuple(train_cfg.betas))
    if sharded:
        engine, optimizer = acc.prepare(PolicyAndValue(policy, value_model), optimizer)
        policy, value_model = engine.module.policy, engine.module.value
        trained = engine
    else:
        policy, value_model, optimizer = acc.prepare(policy, value_model, optimizer)
        trained = policy
    if reward_model is not None:
        reward_model.to(acc.device)
    reference = Reference(acc, policy, recipe.method.kind)

    step, total = 0, train_cfg.max_steps or 1
    if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        step = load_checkpoint(acc, ckpt)["step"]
    batches = micro_batches(len(prompts), cfg.rollout_batch, acc.num_processes, acc.process_index, train_cfg.seed)
    for _ in range(step):
        next(batches)
    stop = StopRequest().install()
    unwrapped = acc.unwrap_model(policy)
    while step < total:
        _, indices = next(batches)
        rollout = collect(unwrapped, reference, value_model, reward, tokenizer, [prompts[i] for i in indices],
                          cfg, acc.device)
        advantages, returns, kl = advantages_for(rollout, cfg)
        started = time.perf_counter()
        stats = ppo_step(acc, policy, value_model, optimizer, rollout, advantages, returns, cfg, train_cfg.grad_clip,
                         seed=train_cfg.seed * 100003 + step)
        train_seconds = time.perf_counter() - started
        step += 1
        stats.update(reward=rollout.scores.mean(), kl=kl.mean(), response_length=rollout.response_mask.sum(-1).mean(),
                     eos_fraction=rollout.has_eos.float().mean())
        values = torch.stack([v.to(acc.device).float() for v in stats.values()])
        values = acc.reduce(values, reduction="mean") if acc.num_processes > 1 else values
        record = {"step": step, **{k: v.item() for k, v in zip(stats, values)},
                  "generation_seconds": rollout.generation_seconds, "training_seconds": train_seconds,
                  "episodes": len(indices) * acc.num_processes, "lr": train_cfg.lr}
        session.log(record)
        stopping = stop.agreed(acc)
        if stopping or (train_cfg.save_every and step % train_cfg.save_every == 0) or step == total:
            save_checkpoint(acc, run_dir, step, {"step": step, "total": total}, keep=train_cfg.keep_checkpoints)
        if stopping and step < total:
            acc.print(f"ftl: {stop.signal_name} received: checkpoint saved at step {step}; rerun with --resume")
            break

    from ftl.train.loop import FitResult

    result = FitResult(steps=step, interrupted=step < total)
    return session.finish(trained, tokenizer, result,
                          lambda: compare_policies(acc, unwrapped, reference, reward, tokenizer, held_out, cfg),
                          part="policy" if sharded else None)
