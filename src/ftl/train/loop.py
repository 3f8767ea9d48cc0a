"""The training loop every stage shares (and the checkpoint-and-stop tail ftl's PPO loop shares with it).

`fit` reads as the loop it is. Per optimizer step: `accumulate` runs train.grad_accum micro-batches
(forward, backward, optimizer and scheduler step; the scheduler waits when fp16's loss scaler skipped the
update); `step_record` reduces the step's statistics across ranks into its metrics record;
`Validation.after_step` evaluates when due (with early stopping, at every epoch end);
`checkpoint_and_maybe_stop` checkpoints on cadence and stops on SIGTERM / SIGUSR1.

Deterministic data order (seed + epoch), so a resumed run skips exactly the micro-batches it had
consumed and reproduces the uninterrupted loss curve. Each rank takes its slice of every global batch.

The recipe's controls (ftl.train.controls) act here: `train.freeze`, layer-wise rates (`train.layer_lr`),
gradual unfreezing (`train.unfreeze`, a list of phases: the optimizer, scheduler and DDP wrapper are
rebuilt at every phase boundary; a checkpoint records its phase, so a resume rebuilds that phase before
loading) and early stopping (`train.early_stopping`: evaluate, checkpoint and maybe keep `best/` at every
epoch end).

A stall watchdog (ftl.train.watchdog, `train.stall_timeout_s`) is beaten at every micro-batch, optimizer step
and evaluation: a rank that stops making progress dumps its stacks and exits instead of hanging the job.

Speed: AdamW/SGD run torch's fused kernel by default (`train.optimizer_impl: auto`; the manifest's
optimizer_builds record which), and `train.compile: true` compiles each transformer block for the training
steps (ftl.train.compiled). A step's parts carry torch.profiler labels (ftl.batch, ftl.forward_loss,
ftl.backward, ftl.optimizer): bench/sft_throughput.py profiles them.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.profiler import record_function

from ftl.config.schema import TrainConfig
from ftl.console import metrics_line
from ftl.errors import DataError, RecipeError
from ftl.run_dir import BEST_DIR, MANIFEST_FILE
from ftl.track.manifest import update_manifest
from ftl.track.memory import release_freed_memory
from ftl.train import controls
from ftl.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from ftl.train.compiled import CompiledBlocks
from ftl.train.distributed import offloads_optimizer, uses_deepspeed
from ftl.train.frozen_base import leave_frozen_base_out
from ftl.train.resume_contract import check_resume_step
from ftl.train.signals import StopRequest
from ftl.train.watchdog import Watchdog

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]  # (mean loss, targets counted)


BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


@dataclass
class FitResult:
    steps: int
    interrupted: bool = False
    resumed_from: Optional[int] = None
    history: list[dict] = field(default_factory=list)
    optimizer_builds: list[dict] = field(default_factory=list)  # one per (re)build: phase, groups, rates
    stopped_early: bool = False
    early_stopping: Optional[dict] = None


def build_optimizer(model, cfg: TrainConfig, param_groups=None, offloaded: bool = False,
                    lr: Optional[float] = None, deepspeed: bool = False):
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    impl = _IMPL_FLAGS.get(optimizer_impl(cfg, params, deepspeed or offloaded), {})
    if offloaded:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam (compiled once, cached)
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # local: importing deepspeed costs seconds

        if cfg.optimizer != "adamw" or cfg.optimizer_impl != "auto":
            raise RecipeError("optimizer offload runs DeepSpeed's CPU Adam: it supports train.optimizer 'adamw' with "
                              "train.optimizer_impl 'auto' only")
        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                adamw_mode=True)
    if cfg.optimizer in BNB_OPTIMIZERS:  # 8-bit / paged optimizers (paged ones fall back to unpaged on CPU)
        import bitsandbytes as bnb  # local: optional, and slow to import

        return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])(
            params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay, **impl)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), **impl)


_IMPL_FLAGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False},
               "torch default": {}}


def optimizer_impl(cfg: TrainConfig, params=(), deepspeed: bool = False) -> str:
    """train.optimizer_impl as this run uses it for a torch adamw/sgd: auto is fused where torch has a fused
    kernel for every parameter's device (CPU and CUDA), except under DeepSpeed, whose engine hands the optimizer
    its own flattened partitions (torch's default there); 'n/a' for optimizers that have no such choice."""
    if cfg.optimizer not in ("adamw", "sgd"):
        if cfg.optimizer_impl != "auto":
            raise RecipeError(f"train.optimizer_impl: {cfg.optimizer_impl!r} applies to train.optimizer adamw or sgd, "
                              f"not {cfg.optimizer!r}; leave it at auto")
        return "n/a"
    if cfg.optimizer_impl != "auto":
        return cfg.optimizer_impl
    if deepspeed:
        return "torch default"
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    supported = set(_get_fused_kernels_supported_devices())
    return "fused" if all(t.device.type in supported and t.is_floating_point() for t in tensors) else "torch default"


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """cfg.scheduler over total_steps (one unfreeze phase's steps when phased), after cfg.warmup_steps."""
    from transformers import get_scheduler  # local: importing transformers costs seconds

    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps)


def micro_batches(n_examples: int, batch_size: int, world: int, rank: int, seed: int) -> Iterator[tuple[int, list]]:
    """Endless (epoch, indices) of this rank's micro-batches; the order depends only on seed + epoch.
    Data too small for one batch is refused here, before the first step, not at it."""
    if n_examples // (batch_size * world) == 0:
        raise DataError(f"{n_examples} training examples cannot fill one batch of {batch_size} x "
                        f"{world} ranks; lower train.batch_size or add data")
    return _micro_batches(n_examples, batch_size, world, rank, seed)


def _micro_batches(n_examples: int, batch_size: int, world: int, rank: int, seed: int):
    per_global = batch_size * world
    per_epoch = n_examples // per_global
    epoch = 0
    while True:
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for b in range(per_epoch):
            chunk = order[b * per_global:(b + 1) * per_global]
            yield epoch, chunk[rank * batch_size:(rank + 1) * batch_size].tolist()
        epoch += 1


class _Optimization:
    """Builds (and at unfreeze-phase boundaries rebuilds) what trains, the optimizer and its scheduler."""

    def __init__(self, accelerator, model, cfg: TrainConfig, n_examples: int, param_groups, run_dir: Path):
        controls.check_settings(cfg, param_groups is not None)
        self.accelerator, self.cfg, self.caller_groups, self.run_dir = accelerator, cfg, param_groups, run_dir
        self.phased = bool(cfg.unfreeze)
        self.grouped = controls.layer_lr_active(cfg)
        self.layout = controls.model_layout(accelerator.unwrap_model(model))
        controls.apply_freeze(accelerator.unwrap_model(model), cfg.freeze, self.layout)
        if cfg.freeze.embeddings and self.layout.tied:
            accelerator.print("ftl: train.freeze.embeddings also freezes the output layer (its weight is tied to the "
                              "input embeddings)")
        # what the method and train.freeze leave trainable; phases choose within it
        self.allowed = set(controls.trainable_names(accelerator.unwrap_model(model)))
        # so everything else stays frozen all run: checkpoints leave it out (rebuilt from the base on resume)
        leave_frozen_base_out(accelerator, [accelerator.unwrap_model(model)])
        if len(cfg.unfreeze) > 1 and uses_deepspeed(accelerator):
            raise RecipeError("train.unfreeze: gradual unfreezing rebuilds the optimizer at each phase boundary, "
                              "which a DeepSpeed engine cannot do; train with DDP (no launch.deepspeed) or one phase")
        self.phases = controls.plan_phases(cfg, n_examples, accelerator.num_processes,
                                           self.layout.num_blocks if self.phased else None)
        self.total = self.phases[-1].end
        self.scheduler_slot = _SchedulerSlot()
        # Not prepared: accelerate would step it once per process, and our step count already
        # accounts for the world size. Registered (through a stable slot, since a phase boundary
        # replaces it) so checkpoints carry its state.
        accelerator.register_for_checkpointing(self.scheduler_slot)
        self.builds: list[dict] = []  # one per (re)build, for the manifest and FitResult.optimizer_builds
        self.phase = 0
        self.base_ratio = 1.0

    @property
    def scheduler(self):
        return self.scheduler_slot.scheduler

    def lr(self) -> float:
        """The schedule's base rate now (the phase's lr, or train.lr, times the schedule factor)."""
        lr = self.scheduler.get_last_lr()[0]
        return lr * self.base_ratio if self.base_ratio != 1.0 else lr

    def build(self, model, phase_index: int, step: int):
        acc, cfg = self.accelerator, self.cfg
        phase = self.phases[phase_index]
        unwrapped = acc.unwrap_model(model)
        if self.builds:  # a phase boundary: drop accelerate's references to the old wrapper and optimizer
            acc.free_memory()
            gc.collect()
        trainable = controls.phase_trainable(self.layout, self.allowed, phase) if self.phased else set(self.allowed)
        if self.phased:
            if not trainable:
                raise RecipeError(f"train.unfreeze[{phase.index}]: nothing trains in this phase (top_blocks="
                                  f"{phase.top_blocks if phase.top_blocks is not None else 'all'}, method and "
                                  "train.freeze leave only "
                                  f"{sorted(self.allowed)[:3]}{' ...' if len(self.allowed) > 3 else ''})")
            for name, param in unwrapped.named_parameters():
                param.requires_grad_(name in trainable)
        params = dict(unwrapped.named_parameters())
        if self.caller_groups is not None:
            names = {id(p): n for n, p in params.items()}
            groups = [controls.Group(f"group.{i}", g.get("lr", phase.lr) if isinstance(g, dict) else phase.lr,
                                     [names[id(p)] for p in (g["params"] if isinstance(g, dict) else [g])])
                      for i, g in enumerate(self.caller_groups)]
            optimizer = build_optimizer(unwrapped, cfg, self.caller_groups, offloaded=offloads_optimizer(acc),
                                        deepspeed=uses_deepspeed(acc))
        else:
            groups = controls.param_groups(self.layout, trainable, phase.lr, cfg)
            if not any(g.names for g in groups):
                raise RecipeError("nothing to train: the method and train.freeze leave no trainable parameter")
            torch_groups = ([{"params": [params[n] for n in g.names], "lr": g.lr} for g in groups]
                            if (self.phased or self.grouped) else None)  # None: the plain trainable list
            optimizer = build_optimizer(unwrapped, cfg, torch_groups, offloaded=offloads_optimizer(acc), lr=phase.lr,
                                        deepspeed=uses_deepspeed(acc))
        # the logged "lr" follows the phase's (or train.lr's) base rate even when group 0 runs at another
        self.base_ratio = phase.lr / groups[0].lr if self.caller_groups is None and groups[0].lr else 1.0
        self.scheduler_slot.scheduler = build_scheduler(optimizer, cfg, phase.steps)
        model, optimizer = acc.prepare(unwrapped, optimizer)
        self.phase = phase_index
        described = controls.describe_groups(groups, params)
        build = {"step": step, "phase": phase_index, "phase_steps": [phase.start + 1, phase.end],
                 "top_blocks": (phase.top_blocks if phase.top_blocks is not None else "all") if self.phased else None,
                 "trainable_tensors": sum(g["tensors"] for g in described),
                 "trainable_params": sum(g["params"] for g in described), "groups": described,
                 "implementation": _implementation_of(optimizer)}
        where = (f"unfreeze phase {phase_index + 1}/{len(self.phases)} (steps {phase.start + 1}-{phase.end}): "
                 if self.phased else "")
        acc.print(f"ftl: optimizer {where}{build['trainable_params']:,} parameters in {len(described)} "
                  f"group{'s' if len(described) != 1 else ''}: {controls.groups_line(described)}")
        _append_to_manifest(acc, self.run_dir, "optimizer_builds", build)
        self.builds.append(build)
        return model, optimizer


def _implementation_of(optimizer) -> str:
    """How the built optimizer runs its update (what train.optimizer_impl resolved to), for the manifest."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    defaults = getattr(inner, "defaults", {})
    if not isinstance(inner, (torch.optim.AdamW, torch.optim.SGD)):
        return type(inner).__name__
    if defaults.get("fused"):
        return "fused"
    return {True: "foreach", False: "for_loop"}.get(defaults.get("foreach"), "torch default")


class _SchedulerSlot:
    """A stable checkpointing handle for whichever scheduler the current phase uses."""

    scheduler = None

    def state_dict(self):
        return self.scheduler.state_dict()

    def load_state_dict(self, state):
        self.scheduler.load_state_dict(state)


def fit(*, accelerator, model, cfg: TrainConfig, features: list[dict], collate: Callable[[list[dict]], dict],
        loss_fn: LossFn, run_dir: Path, log: Callable[[dict], None], resume: bool = False,
        evaluate: Optional[Callable[[torch.nn.Module], dict]] = None, eval_every: Optional[int] = None,
        param_groups=None, progress: bool = True,
        save_model: Optional[Callable[[torch.nn.Module, Path], None]] = None,
        before_training: Optional[Callable[[torch.nn.Module], None]] = None) -> tuple[torch.nn.Module, FitResult]:
    """Train `model` on `features`. `evaluate(model)` returns validation metrics (used every `eval_every`
    steps and, with train.early_stopping, at every epoch end); `save_model(model, folder)` writes a
    usable model folder (default: accelerate's model.safetensors) for the `best/` copy;
    `before_training(model)` runs on the prepared model before a fresh (not resumed) run's first step."""
    opt = _Optimization(accelerator, model, cfg, len(features), param_groups, run_dir)
    compiled = CompiledBlocks(accelerator, accelerator.unwrap_model(model), opt.layout) if cfg.compile else None
    _set_in_manifest(accelerator, run_dir, "compile", compiled.info if compiled else {"enabled": False})
    if compiled:  # evaluation and generation (other shapes, a KV cache) run the blocks eagerly
        evaluate = compiled.eagerly(evaluate) if evaluate is not None else None
        before_training = compiled.eagerly(before_training) if before_training is not None else None
    total = opt.total
    watchdog = Watchdog(cfg.stall_timeout_s, run_dir, accelerator.process_index)
    evaluate = watchdog.watched(evaluate)
    validation = Validation(accelerator, cfg, len(features), total, evaluate, eval_every, log, run_dir, save_model)
    result = FitResult(steps=total, optimizer_builds=opt.builds)
    model, optimizer, step = _start_or_resume(accelerator, model, opt, validation.stopper, run_dir, resume,
                                              before_training, result)
    stop = StopRequest().install()
    batches = watchdog.beating(training_batches(accelerator, cfg, features, collate, done_steps=step))

    bar = _progress(total, step, enabled=progress and accelerator.is_main_process)
    model.train()
    # watched only while it trains: the final evaluation and save (in the stage) may take far longer
    with watchdog.running(step):
        while step < total and not validation.stopper.stopped:
            if (upcoming := controls.phase_for_next_step(opt.phases, step)) != opt.phase:
                model, optimizer = opt.build(model, upcoming, step)
                model.train()
            started = time.perf_counter()
            done = accumulate(accelerator, model, optimizer, opt.scheduler, batches, loss_fn, cfg)
            step += 1
            record = step_record(accelerator, step, done, opt.lr(), opt.phase if opt.phased else None, started)
            watchdog.beat(step)
            if step % cfg.log_every == 0 or step == total:
                log(record)
                result.history.append(record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(progress_fields(record))
            epoch_evaluated = validation.after_step(model, step)
            state = {"step": step, "total": total, "unfreeze_phase": opt.phase, **validation.checkpoint_state()}
            if checkpoint_and_maybe_stop(accelerator, run_dir, step, state, cfg, stop, force=epoch_evaluated,
                                         last=step == total or validation.stopper.stopped):
                result.interrupted = True
                break
            if validation.stops_early(step):
                break
    if bar is not None:
        bar.close()
    if compiled:
        compiled.release()  # the stage's final evaluation, generation and save run eagerly
    result.steps = step
    if validation.stopper.enabled:
        result.early_stopping = validation.stopper.state()
        result.stopped_early = validation.stopper.stopped
    return model, result


def _start_or_resume(accelerator, model, opt: _Optimization, stopper: controls.EarlyStopping, run_dir: Path,
                     resume: bool, before_training, result: FitResult):
    """Build the optimizer where the run starts: a fresh run's first phase, or the latest checkpoint's
    phase with the checkpoint (model, optimizer, scheduler, RNG, early stopping) loaded into it."""
    step, saved = 0, {}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = read_state(ckpt)
        step = saved["step"]
        check_resume_step(step, opt.total, ckpt, accelerator.print)
    # the phase whose optimizer the checkpoint holds (a checkpoint at a boundary holds the earlier phase's)
    phase = saved.get("unfreeze_phase", controls.phase_of_step(opt.phases, step))
    model, optimizer = opt.build(model, phase, step)
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt)
        stopper.restore(saved.get("early_stopping"))
        result.resumed_from = step
        accelerator.print(f"ftl: resumed from {ckpt} (step {step} of {opt.total})")
    elif before_training is not None:
        before_training(model)
        release_freed_memory()  # evaluation's freed buffers: not resident under training's
    return model, optimizer, step


def training_batches(accelerator, cfg: TrainConfig, features: list[dict], collate, done_steps: int = 0
                     ) -> Iterator[tuple[int, list[dict], dict]]:
    """This rank's micro-batches as (epoch, rows, collated batch on the device), after skipping those the
    first `done_steps` optimizer steps consumed (what a resumed run's checkpoint had trained on)."""
    batches = micro_batches(len(features), cfg.batch_size, accelerator.num_processes, accelerator.process_index,
                            cfg.seed)
    for _ in range(done_steps * cfg.grad_accum):
        next(batches)

    def collated():
        for epoch, indices in batches:
            rows = [features[i] for i in indices]
            yield epoch, rows, {k: v.to(accelerator.device) for k, v in collate(rows).items()}

    return collated()


@dataclass
class Accumulated:
    """What one optimizer step's micro-batches did on this rank."""

    losses: list[torch.Tensor]  # one mean loss per micro-batch
    tokens: int                 # input tokens, padding not counted
    targets: int                # tokens the loss counted
    epoch: int                  # the epoch of the last micro-batch
    skipped: bool = False       # the fp16 loss scaler skipped the update (inf/nan gradients)


def accumulate(accelerator, model, optimizer, scheduler, batches, loss_fn: LossFn, cfg: TrainConfig) -> Accumulated:
    """One optimizer step: forward and backward over train.grad_accum micro-batches. accelerate's prepared
    optimizer steps (after clipping) only where gradients sync, the last micro-batch; the scheduler with it,
    unless fp16's loss scaler skipped that update (the schedule then waits for the next real update)."""
    losses, tokens, targets, skipped = [], 0, 0, False
    for _ in range(cfg.grad_accum):
        with record_function("ftl.batch"):  # the labels name a step's parts in a torch.profiler trace
            epoch, rows, batch = next(batches)
        with accelerator.accumulate(model):
            with record_function("ftl.forward_loss"):
                loss, n_targets = loss_fn(model, batch)
            with record_function("ftl.backward"):
                accelerator.backward(loss)
            with record_function("ftl.optimizer"):
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    skipped = accelerator.optimizer_step_was_skipped
                    if not skipped:
                        scheduler.step()
                optimizer.zero_grad()
        losses.append(loss.detach().float())
        tokens += sum(len(v) for r in rows for k, v in r.items() if k.endswith("input_ids"))  # no padding
        targets += n_targets
    return Accumulated(losses, tokens, targets, epoch, skipped)


def step_record(accelerator, step: int, done: Accumulated, lr: float, phase: Optional[int], started: float) -> dict:
    """The step's metrics record: loss averaged over ranks, tokens and trained tokens summed over them."""
    stats = torch.tensor([torch.stack(done.losses).mean().item(), float(done.tokens), float(done.targets)],
                         device=accelerator.device)
    stats = accelerator.reduce(stats, reduction="sum") if accelerator.num_processes > 1 else stats
    record = {"step": step, "epoch": done.epoch, "loss": stats[0].item() / accelerator.num_processes,
              "lr": lr, "tokens": int(stats[1].item()),
              "trained_tokens": int(stats[2].item()),
              "step_time": time.perf_counter() - started}
    if phase is not None:
        record["unfreeze_phase"] = phase
    if done.skipped:
        record["optimizer_step_skipped"] = True
    return record


def checkpoint_and_maybe_stop(accelerator, run_dir: Path, step: int, state: dict, cfg: TrainConfig,
                              stop: StopRequest, *, last: bool, force: bool = False) -> bool:
    """The end of every optimizer step in ftl's own loops (fit, PPO). All ranks agree whether a stop
    signal arrived; the step is checkpointed (with `state`) when one did, every train.save_every steps,
    at the run's `last` step, or when `force`d. True when the signal stops the run before its last step."""
    stopping = stop.agreed(accelerator)
    if stopping or force or last or (cfg.save_every and step % cfg.save_every == 0):
        save_checkpoint(accelerator, run_dir, step, state, keep=cfg.keep_checkpoints)
    if stopping and not last:
        accelerator.print(f"ftl: {stop.signal_name or 'stop signal'} received: checkpoint saved at "
                          f"step {step}; rerun with --resume to continue")
        return True
    return False


class Validation:
    """Validation while training: every `eval_every` steps and, with train.early_stopping, at every epoch
    end, where an improvement is kept in best/ and `patience` epochs without one stop the run."""

    def __init__(self, accelerator, cfg: TrainConfig, n_examples: int, total: int, evaluate, eval_every,
                 log, run_dir: Path, save_model):
        self.stopper = controls.EarlyStopping(cfg.early_stopping)
        if self.stopper.enabled and evaluate is None:
            raise RecipeError("train.early_stopping.metric: this stage has no validation evaluation to stop on")
        self.accelerator, self.cfg, self.total, self.evaluate, self.eval_every = (accelerator, cfg, total, evaluate,
                                                                                  eval_every)
        self.log, self.run_dir, self.save_model = log, run_dir, save_model
        self.per_epoch = controls.micro_batches_per_epoch(n_examples, cfg.batch_size, accelerator.num_processes)

    def after_step(self, model, step: int) -> bool:
        """Evaluate when due; True when an epoch-end evaluation ran (the checkpoint of this step records it)."""
        accum, per_epoch = self.cfg.grad_accum, self.per_epoch
        epoch_end = (step * accum) // per_epoch > ((step - 1) * accum) // per_epoch or step == self.total
        if self.stopper.enabled and epoch_end:
            self._epoch_end(model, step, math.ceil(step * accum / per_epoch))
            model.train()
            return True
        if self.evaluate is not None and self.eval_every and step % self.eval_every == 0 and step < self.total:
            release_freed_memory()  # training's freed activations: not resident under evaluation's buffers
            metrics = self.evaluate(model)
            release_freed_memory()
            say(self.accelerator, metrics_line(f"step {step}", metrics))
            self.log({"step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
            model.train()
        return False

    def _epoch_end(self, model, step: int, epoch: int) -> None:
        """Evaluate at an epoch end; on improvement write best/ (before the checkpoint that records it, so a
        kill in between redoes the epoch and rewrites the same best/)."""
        accelerator, stopper = self.accelerator, self.stopper
        release_freed_memory()
        metrics = self.evaluate(model)
        release_freed_memory()
        value = stopper.value_from(metrics)
        improved = stopper.update(value, epoch, step)
        self.log({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}})
        if improved:
            _save_best(accelerator, model, self.run_dir, self.save_model,
                       {"epoch": epoch, "step": step, "metric": stopper.cfg.metric, "value": value})
        state = stopper.state()
        say(accelerator, f"ftl: epoch {epoch} (step {step}): validation {stopper.cfg.metric} {value:.6g}"
                          f"{' (best so far)' if improved else f', no improvement for {stopper.bad_epochs} epoch(s)'}")
        _set_in_manifest(accelerator, self.run_dir, "early_stopping", {k: v for k, v in state.items() if k != "history"})

    def checkpoint_state(self) -> dict:
        """What a checkpoint carries for early stopping (nothing without it)."""
        return {"early_stopping": self.stopper.state()} if self.stopper.enabled else {}

    def stops_early(self, step: int) -> bool:
        if not self.stopper.stopped:
            return False
        stopper, cfg = self.stopper, self.cfg.early_stopping
        self.accelerator.print(f"ftl: early stopping at step {step}: validation {cfg.metric} did not improve for "
                               f"{cfg.patience} epochs (best {stopper.best:.6g} at epoch {stopper.best_epoch}, "
                               f"kept in {self.run_dir / BEST_DIR})")
        return True


def _save_best(accelerator, model, run_dir: Path, save_model, info: dict) -> None:
    target, tmp, old = run_dir / BEST_DIR, run_dir / f".{BEST_DIR}.partial", run_dir / f".{BEST_DIR}.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    if save_model is not None:
        save_model(model, tmp)  # collective (gathers ZeRO-3 shards); the main process writes
    else:
        accelerator.save_model(model, tmp)
    if accelerator.is_main_process:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "best.json").write_text(json.dumps(info, indent=1))
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _append_to_manifest(accelerator, run_dir: Path, key: str, value) -> None:
    path = run_dir / MANIFEST_FILE
    if accelerator.is_main_process and path.exists():
        update_manifest(path, **{key: json.loads(path.read_text()).get(key, []) + [value]})


def _set_in_manifest(accelerator, run_dir: Path, key: str, value) -> None:
    path = run_dir / MANIFEST_FILE
    if accelerator.is_main_process and path.exists():
        update_manifest(path, **{key: value})


def say(accelerator, text: str) -> None:
    """accelerator.print for a line printed while the progress bar shows: the bar steps aside, then redraws."""
    if accelerator.is_main_process:
        from tqdm import tqdm

        with tqdm.external_write_mode():
            print(text, flush=True)


def progress_fields(record: dict) -> dict:
    """What the bar shows after each step: loss, learning rate and tokens per second (all ranks)."""
    seconds = record.get("step_time") or 0.0
    return {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
            "tok/s": f"{record['tokens'] / seconds:,.0f}" if seconds > 0 else "-"}


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # local: only the main process shows a bar

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
