"""PPO (RLHF step 3) on accelerate — TRL removed its PPOTrainer in 1.13, so ftl owns this loop.

Per iteration: sample responses (ppo.samples_per_prompt per prompt) to a batch of prompts; score them
(reward model or function) with a KL penalty to the frozen reference; advantages by `ppo.advantage`
(ftl.rl.advantages: gae with a value model, whitened — PPO proper; or the critic-free rloo and reinforce_pp);
then several PPO epochs of mini-batches with the clipped policy loss (and, for gae, the clipped value loss:
policy and value model train together, or with ppo.critic shared a value head on the policy's own hidden states,
ftl.rl.value_head; critic-free estimators build no value model).
A LoRA policy's reference is the same model with its adapter disabled (no second copy in memory). Under
ZeRO-3 a full policy's reference is a frozen copy loaded partitioned, with an inference engine of its own
(ftl.rl.frozen_engine), and so is a reward model.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from ftl.config.schema import Recipe
from ftl.data.tokenize import generation_prompt
from ftl.errors import RecipeError
from ftl.models.load import load_model
from ftl.rl import maths
from ftl.rl.advantages import ESTIMATORS, advantages as estimate_advantages
from ftl.rl.compare import compare_policies
from ftl.rl.kl_control import next_kl_coef
from ftl.rl.reference import Reference, load_partitioned
from ftl.rl.reward import load_reward
from ftl.rl.rollout import Rollout, collect, ignores_position_ids, response_logprobs, response_values, trimmed
from ftl.rl.value_head import ValueHead, is_value_head
from ftl.stages.session import RunSession
from ftl.train.checkpoint import latest_checkpoint, load_checkpoint
from ftl.train.distributed import is_sharded
from ftl.train.frozen_base import leave_frozen_base_out
from ftl.train.loop import FitResult, checkpoint_and_maybe_stop, micro_batches
from ftl.train.resume_contract import check_resume_step
from ftl.train.signals import StopRequest
from ftl.train.watchdog import Watchdog


class PolicyAndValue(torch.nn.Module):
    """One module for DeepSpeed: accelerate gives one engine per model, and ZeRO-3 gathers parameters
    through hooks on every submodule, so the policy and value model are called directly. value None: a
    critic-free estimator's policy alone; with a shared critic, value is the head (ftl.rl.value_head)."""

    def __init__(self, policy, value):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config  # accelerate sizes DeepSpeed's "auto" buckets from hidden_size

    def forward(self, *args, **kwargs):
        raise RuntimeError("call .policy or .value")


def ppo_step(accelerator, policy, value_model, optimizer, rollout: Rollout, advantages, returns, cfg, grad_clip,
             seed: int, chunk_tokens: int):
    """Several epochs of clipped updates over shuffled mini-batches of one rollout; returns mean statistics.
    value_model None (a critic-free estimator): the policy loss alone, no value statistics."""
    stats = {"policy_loss": [], "value_loss": [], "clip_fraction": [], "value_clip_fraction": [], "entropy": []}
    if value_model is None:
        del stats["value_loss"], stats["value_clip_fraction"]
    n = rollout.sequences.shape[0]
    policy.train()
    if value_model is not None:
        value_model.train()
    # a mini-batch runs on the columns its rows use (exact: see trimmed), unless the policy ignores position ids
    trim = not ignores_position_ids(policy)
    shared_critic = is_value_head(value_model)
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        for start in range(0, n, cfg.mini_batch):
            idx = order[start:start + cfg.mini_batch].to(rollout.sequences.device)
            seq, mask, pos = rollout.sequences[idx], rollout.attention_mask[idx], rollout.position_ids[idx]
            prompt_length, width = rollout.prompt_length, seq.shape[1] - rollout.prompt_length
            if trim:
                seq, mask, pos, prompt_length, width = trimmed(seq, mask, pos, prompt_length)
            resp_mask = rollout.response_mask[idx, :width]
            hidden = [] if shared_critic else None  # the policy's forward is the critic's too
            logprobs, entropy = response_logprobs(policy, seq, mask, pos, prompt_length, rollout.temperature,
                                                  with_entropy=True, chunk_tokens=chunk_tokens, hidden_out=hidden)
            pg_loss, clip_fraction = maths.policy_loss(logprobs, rollout.logprobs[idx, :width],
                                                       advantages[idx, :width], resp_mask, cfg.clip_range)
            loss = pg_loss
            if value_model is not None:
                values = value_model(hidden[0]) if shared_critic else \
                    response_values(value_model, seq, mask, pos, prompt_length)
                vf_loss, vf_clip = maths.value_loss(values, rollout.values[idx, :width], returns[idx, :width],
                                                    resp_mask, cfg.clip_range_value)
                loss = pg_loss + cfg.vf_coef * vf_loss
            accelerator.backward(loss)
            if grad_clip:
                accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
            optimizer.step()
            optimizer.zero_grad()
            step_stats = {"policy_loss": pg_loss, "clip_fraction": clip_fraction,
                          "entropy": maths.masked_mean(entropy.detach(), resp_mask)}
            if value_model is not None:
                step_stats.update(value_loss=vf_loss, value_clip_fraction=vf_clip)
            for key in stats:
                stats[key].append(step_stats[key].detach().float())
    return {k: torch.stack(v).mean() for k, v in stats.items()}


def advantages_for(rollout: Rollout, cfg, kl_coef: float):
    """(advantages, returns or None, per-sequence KL) by cfg.advantage, the KL penalised by `kl_coef` (the
    iteration's: cfg.kl_coef, or where ppo.kl_target has moved it); reinforce_pp's is a collective."""
    kl = maths.kl_estimate(rollout.logprobs, rollout.ref_logprobs, "k1") * rollout.response_mask
    advantages, returns = estimate_advantages(cfg.advantage, rollout.scores, kl, rollout.response_mask,
                                              rollout.values, cfg.model_copy(update={"kl_coef": kl_coef}))
    return advantages, returns, kl.sum(-1)


def check_iterations(recipe: Recipe) -> None:
    """PPO runs train.max_steps iterations (1 without it): a recipe's train.epochs is refused, not ignored."""
    if "epochs" in recipe.train.model_fields_set and recipe.train.max_steps is None:
        raise RecipeError("train.epochs: PPO counts iterations (rollout + PPO epochs), not passes over the "
                          "prompts; set train.max_steps")


def run_ppo(recipe: Recipe, run_dir: Path, resume: bool = False) -> dict:
    check_iterations(recipe)
    session = RunSession(recipe, run_dir, resume)
    acc = session.accelerator
    splits, tokenizer = session.open()
    prompts = [generation_prompt(tokenizer, r, recipe.data.system_prompt)[0] for r in splits.train]
    held_out = [generation_prompt(tokenizer, r, recipe.data.system_prompt)[0]
                for r in session.validation_records(splits)]
    session.note_prompt_lengths(tokenizer, prompts)  # what the planned peak in the manifest is computed for
    models = PPOModels.prepare(session, tokenizer)

    step, total, kl_coef = 0, recipe.train.max_steps or 1, recipe.ppo.kl_coef
    if resume and (checkpoint := latest_checkpoint(run_dir)) is not None:
        state = load_checkpoint(acc, checkpoint)
        step, kl_coef = state["step"], state.get("kl_coef", kl_coef)  # an adaptive coefficient goes on where it was
        check_resume_step(step, total, checkpoint, acc.print)
    batches = micro_batches(len(prompts), recipe.ppo.rollout_batch, acc.num_processes, acc.process_index,
                            recipe.train.seed)
    for _ in range(step):  # skip the prompt batches the checkpointed run had used
        next(batches)
    stop = StopRequest().install()
    # watched only while it trains, like fit: the final comparison and save may take far longer
    with Watchdog(recipe.train.stall_timeout_s, run_dir, acc.process_index).running(step) as watchdog:
        while step < total:
            _, indices = next(batches)
            record = ppo_iteration(session, models, tokenizer, [prompts[i] for i in indices], step, kl_coef)
            session.log(record)
            kl_coef = next_kl_coef(kl_coef, record["kl"], recipe.ppo.kl_target)  # the KL mean of all ranks
            step += 1
            watchdog.beat(step)
            if checkpoint_and_maybe_stop(acc, run_dir, step, {"step": step, "total": total, "kl_coef": kl_coef},
                                         recipe.train, stop, last=step == total):
                break

    result = FitResult(steps=step, interrupted=step < total)
    return session.finish(models.trained, tokenizer, result,
                          lambda: compare_policies(acc.device, models.unwrapped_policy, models.reference,
                                                   models.reward, tokenizer, held_out, recipe.sampling,
                                                   chunk_tokens=recipe.train.loss_chunk_tokens),
                          part="policy" if models.sharded else None)


class PPOModels:
    """The policy (the recipe's method on the base), its value model, reward and frozen reference, prepared
    by accelerate: under ZeRO-3 policy and value share one engine (`trained`), else the policy is `trained`.
    Under ZeRO-3 every frozen model is partitioned too, each in an inference engine of its own
    (ftl.rl.frozen_engine): a full policy's reference (a partitioned copy of the initial policy) and a reward
    model; a LoRA-family policy's reference is its adapter-disabled self."""

    @classmethod
    def prepare(cls, session: RunSession, tokenizer) -> "PPOModels":
        recipe, acc = session.recipe, session.accelerator
        self = cls()
        self.sharded = is_sharded(acc)
        reference_kind = Reference.kind_for(recipe.method.kind, self.sharded)
        with_value = ESTIMATORS[recipe.ppo.advantage].value_model
        session.record("ppo", {"reference": reference_kind, "reward": recipe.reward.kind,
                               "advantage": recipe.ppo.advantage, "samples_per_prompt": recipe.ppo.samples_per_prompt,
                               "value_model": with_value, **({"critic": recipe.ppo.critic} if with_value else {})})
        cls.check_reference(recipe.method.kind, self.sharded)
        policy = session.prepare_model(tokenizer)
        if not self.sharded:
            self.reward = load_reward(recipe)  # on the CPU until the engines are prepared
        value = load_value_model(session, tokenizer, policy) if with_value else None
        t = recipe.train
        modules = [policy] + ([value] if value is not None else [])
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.betas),
                                      fused=not is_sharded(acc))  # fused: 2-3x faster on CPU; ZeRO-3 keeps its own
        if self.sharded:
            engine, self.optimizer = acc.prepare(PolicyAndValue(policy, value), optimizer)
            self.policy, self.value, self.trained = engine.module.policy, engine.module.value, engine
        elif value is not None:
            self.policy, self.value, self.optimizer = acc.prepare(policy, value, optimizer)
            self.trained = self.policy
        else:
            self.policy, self.optimizer = acc.prepare(policy, optimizer)
            self.value, self.trained = None, self.policy
        # the policy's frozen base stays out of checkpoints (policy adapter and value model are saved)
        leave_frozen_base_out(acc, modules)
        self.unwrapped_policy = acc.unwrap_model(self.policy)
        if self.sharded:  # after the trained engine: accelerate has resolved the run's DeepSpeed config
            self.reward = load_reward(recipe, partitioned_by=acc)
        elif self.reward.model is not None:
            self.reward.model.to(acc.device)
        if reference_kind == "partitioned_copy":
            self.reference = Reference.frozen_model(load_partitioned(acc, recipe, session.base_dir(tokenizer)),
                                                    kind=reference_kind)
        else:
            self.reference = Reference(acc, self.policy, recipe.method.kind)
        if self.sharded:
            self.record_partitions(session)
        return self

    # methods whose initial policy is the base model itself: a ZeRO-3 reference is the base loaded again
    ZERO3_COPY_METHODS = ("full",)

    @classmethod
    def check_reference(cls, method_kind: str, sharded: bool) -> None:
        """Under ZeRO-3 a policy needs a reference that can be built partitioned: refused otherwise."""
        if Reference.kind_for(method_kind, sharded) == "partitioned_copy" and method_kind not in cls.ZERO3_COPY_METHODS:
            raise RecipeError(f"method.kind {method_kind}: PPO under ZeRO-3 takes a full policy (its reference is a "
                              "partitioned copy of the base, loaded again) or a LoRA-family one (lora/dora/qlora/"
                              f"lora8bit: the adapter-disabled model); a {method_kind} policy's initial model is not "
                              "the base alone: use method.kind full or lora, or drop ZeRO-3 (launch.deepspeed)")

    def record_partitions(self, session: RunSession) -> None:
        """What each rank holds of every model under ZeRO-3 (shard vs full element counts), in the manifest
        (`ppo_partitions`, one entry per rank) and on the console."""
        from accelerate.utils import gather_object

        from ftl import run_dir as layout
        from ftl.rl.frozen_engine import partition_numel
        from ftl.track.manifest import update_manifest

        acc = session.accelerator
        held = {"policy": partition_numel(self.unwrapped_policy)}
        if self.value is not None:
            held["value"] = partition_numel(self.value)
        if self.reference.kind == "partitioned_copy":
            held["reference"] = partition_numel(self.reference.frozen)
        if self.reward.model is not None:
            held["reward"] = partition_numel(self.reward.model)
        ranks = gather_object([{"rank": acc.process_index, **held}])
        if acc.is_main_process:
            update_manifest(session.run_dir / layout.MANIFEST_FILE, ppo_partitions=ranks)
        acc.print("ftl: ZeRO-3: rank 0 holds " + ", ".join(
            f"{name} {n['local']:,} of {n['full']:,} ({100 * n['local'] / max(n['full'], 1):.1f}%)"
            for name, n in held.items()))


def load_value_model(session: RunSession, tokenizer, policy):
    """gae's value model: a head on the policy's trunk (ppo.critic shared, ftl.rl.value_head), or a model of its
    own from the reward model (ppo.value_from reward, a model reward) or the policy's base."""
    recipe = session.recipe
    if recipe.ppo.critic == "shared":
        return ValueHead(policy.config.hidden_size)
    from_reward = recipe.ppo.value_from == "reward" and recipe.reward.kind == "model"
    value_dir = Path(recipe.reward.path) if from_reward else session.base_dir(tokenizer)
    value = load_model(recipe.model.model_copy(update={"gradient_checkpointing": False}), value_dir,
                       head="sequence_classification")
    value.config.pad_token_id = tokenizer.pad_token_id
    return value


def ppo_iteration(session: RunSession, models: PPOModels, tokenizer, prompts: list[str], step: int,
                  kl_coef: float) -> dict:
    """One PPO iteration: sample and score a rollout, then several epochs of clipped updates with the KL
    penalised by `kl_coef`; returns the metrics record of optimizer step `step + 1`, averaged over ranks."""
    recipe, acc = session.recipe, session.accelerator
    k = recipe.ppo.samples_per_prompt
    prompts = [p for p in prompts for _ in range(k)]  # a prompt's k samples on contiguous rows
    # in the recipe's precision: a PEFT policy's generate bypasses the autocast accelerate wraps its forward in,
    # and the reward model is not prepared (under ZeRO-3 the engines cast the weights themselves)
    with contextlib.nullcontext() if models.sharded else acc.autocast():
        rollout = collect(models.unwrapped_policy, models.reference, models.value, models.reward, tokenizer, prompts,
                          recipe.sampling, acc.device, recipe.train.loss_chunk_tokens)
    advantages, returns, kl = advantages_for(rollout, recipe.ppo, kl_coef)
    started = time.perf_counter()
    stats = ppo_step(acc, models.policy, models.value, models.optimizer, rollout, advantages, returns, recipe.ppo,
                     recipe.train.grad_clip, seed=recipe.train.seed * 100003 + step,
                     chunk_tokens=recipe.train.loss_chunk_tokens)
    train_seconds = time.perf_counter() - started
    stats.update(reward=rollout.scores.mean(), kl=kl.mean(), response_length=rollout.response_mask.sum(-1).mean(),
                 eos_fraction=rollout.has_eos.float().mean())
    values = torch.stack([v.to(acc.device).float() for v in stats.values()])
    values = acc.reduce(values, reduction="mean") if acc.num_processes > 1 else values
    return {"step": step + 1, **{k: v.item() for k, v in zip(stats, values)},
            "generation_seconds": rollout.generation_seconds, "training_seconds": train_seconds,
            "episodes": len(prompts) * acc.num_processes, "lr": recipe.train.lr, "kl_coef": kl_coef}
