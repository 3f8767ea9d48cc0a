"""The training loop every stage shares.

Deterministic data order (seed + epoch), so a resumed run skips exactly the micro-batches it had
consumed and reproduces the uninterrupted loss curve. Each rank takes its slice of every global batch.

The recipe's controls (ftl.train.controls) act here: `train.freeze`, layer-wise rates (`train.layer_lr`),
staged unfreezing (`train.unfreeze`: the optimizer, scheduler and DDP wrapper are rebuilt at every stage
boundary; a checkpoint records its stage, so a resume rebuilds that stage before loading) and early
stopping (`train.early_stopping`: evaluate, checkpoint and maybe keep `best/` at every epoch end).
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
from typing import Callable, Optional

import torch

from ftl.config.schema import TrainConfig
from ftl.errors import DataError, RecipeError
from ftl.run_dir import MANIFEST_FILE
from ftl.train import controls
from ftl.train.checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from ftl.train.distributed import offloads_optimizer, uses_deepspeed
from ftl.train.signals import StopRequest

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]  # (mean loss, targets counted)


BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


@dataclass
class FitResult:
    steps: int
    interrupted: bool = False
    resumed_from: Optional[int] = None
    history: list[dict] = field(default_factory=list)
    optimizer_builds: list[dict] = field(default_factory=list)  # one per (re)build: stage, groups, rates
    stopped_early: bool = False
    early_stopping: Optional[dict] = None


BEST_DIR = "best"


def build_optimizer(model, cfg: TrainConfig, param_groups=None, offloaded: bool = False,
                    lr: Optional[float] = None):
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    lr = cfg.lr if lr is None else lr
    if offloaded:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam (compiled once, cached)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if cfg.optimizer != "adamw":
            raise ValueError("optimizer offload supports train.optimizer 'adamw' only")
        return DeepSpeedCPUAdam(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                adamw_mode=True)
    if cfg.optimizer in BNB_OPTIMIZERS:  # 8-bit / paged optimizers (paged ones fall back to unpaged on CPU)
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])(
            params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    """cfg.scheduler over total_steps (one unfreeze stage's steps when staged), after cfg.warmup_steps."""
    from transformers import get_scheduler

    return get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                         num_training_steps=total_steps)


def micro_batches(n_examples: int, batch_size: int, world: int, rank: int, seed: int):
    """Endless (epoch, indices) of this rank's micro-batches; the order depends only on seed + epoch."""
    per_global = batch_size * world
    per_epoch = n_examples // per_global
    if per_epoch == 0:
        raise DataError(f"{n_examples} training examples cannot fill one batch of {batch_size} x "
                        f"{world} ranks; lower train.batch_size or add data")
    epoch = 0
    while True:
        order = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        for b in range(per_epoch):
            chunk = order[b * per_global:(b + 1) * per_global]
            yield epoch, chunk[rank * batch_size:(rank + 1) * batch_size].tolist()
        epoch += 1


def total_optimizer_steps(cfg: TrainConfig, n_examples: int, world: int) -> int:
    """Staged unfreezing defines the length (the sum of its stages); else max_steps, else epochs."""
    return controls.plan_stages(cfg, n_examples, world)[-1].end


class _Optimization:
    """Builds (and at unfreeze-stage boundaries rebuilds) what trains, the optimizer and its scheduler."""

    def __init__(self, accelerator, model, cfg: TrainConfig, n_examples: int, param_groups, run_dir: Path):
        controls.check_settings(cfg, param_groups is not None)
        self.accelerator, self.cfg, self.caller_groups, self.run_dir = accelerator, cfg, param_groups, run_dir
        self.staged = bool(cfg.unfreeze)
        self.grouped = controls.layer_lr_active(cfg)
        self.layout = controls.model_layout(accelerator.unwrap_model(model))
        controls.apply_freeze(accelerator.unwrap_model(model), cfg.freeze, self.layout)
        if cfg.freeze.embeddings and self.layout.tied:
            accelerator.print("ftl: train.freeze.embeddings also freezes the output layer (its weight is tied to the "
                              "input embeddings)")
        # what the method and train.freeze leave trainable; stages choose within it
        self.allowed = set(controls.trainable_names(accelerator.unwrap_model(model)))
        if len(cfg.unfreeze) > 1 and uses_deepspeed(accelerator):
            raise RecipeError("train.unfreeze: staged unfreezing rebuilds the optimizer at each stage boundary, "
                              "which a DeepSpeed engine cannot do; train with DDP (no launch.deepspeed) or one stage")
        self.stages = controls.plan_stages(cfg, n_examples, accelerator.num_processes,
                                           self.layout.num_blocks if self.staged else None)
        self.total = self.stages[-1].end
        self.scheduler_slot = _SchedulerSlot()
        # Not prepared: accelerate would step it once per process, and our step count already
        # accounts for the world size. Registered (through a stable slot, since a stage boundary
        # replaces it) so checkpoints carry its state.
        accelerator.register_for_checkpointing(self.scheduler_slot)
        self.built = False
        self.stage = 0
        self.base_ratio = 1.0

    @property
    def scheduler(self):
        return self.scheduler_slot.scheduler

    def lr(self) -> float:
        """The schedule's base rate now (the stage's lr, or train.lr, times the schedule factor)."""
        lr = self.scheduler.get_last_lr()[0]
        return lr * self.base_ratio if self.base_ratio != 1.0 else lr

    def build(self, model, stage_index: int, step: int):
        acc, cfg = self.accelerator, self.cfg
        stage = self.stages[stage_index]
        unwrapped = acc.unwrap_model(model)
        if self.built:  # a stage boundary: drop accelerate's references to the old wrapper and optimizer
            acc.free_memory()
            gc.collect()
        trainable = controls.stage_trainable(self.layout, self.allowed, stage) if self.staged else set(self.allowed)
        if self.staged:
            if not trainable:
                raise RecipeError(f"train.unfreeze[{stage.index}]: nothing trains in this stage (top_blocks="
                                  f"{stage.top_blocks if stage.top_blocks is not None else 'all'}, method and "
                                  "train.freeze leave only "
                                  f"{sorted(self.allowed)[:3]}{' ...' if len(self.allowed) > 3 else ''})")
            for name, param in unwrapped.named_parameters():
                param.requires_grad_(name in trainable)
        params = dict(unwrapped.named_parameters())
        if self.caller_groups is not None:
            names = {id(p): n for n, p in params.items()}
            groups = [controls.Group(f"group.{i}", g.get("lr", stage.lr) if isinstance(g, dict) else stage.lr,
                                     [names[id(p)] for p in (g["params"] if isinstance(g, dict) else [g])])
                      for i, g in enumerate(self.caller_groups)]
            optimizer = build_optimizer(unwrapped, cfg, self.caller_groups, offloaded=offloads_optimizer(acc))
        else:
            groups = controls.param_groups(self.layout, trainable, stage.lr, cfg)
            if not any(g.names for g in groups):
                raise RecipeError("nothing to train: the method and train.freeze leave no trainable parameter")
            torch_groups = ([{"params": [params[n] for n in g.names], "lr": g.lr} for g in groups]
                            if (self.staged or self.grouped) else None)  # None: the plain trainable list
            optimizer = build_optimizer(unwrapped, cfg, torch_groups, offloaded=offloads_optimizer(acc), lr=stage.lr)
        # the logged "lr" follows the stage's (or train.lr's) base rate even when group 0 runs at another
        self.base_ratio = stage.lr / groups[0].lr if self.caller_groups is None and groups[0].lr else 1.0
        self.scheduler_slot.scheduler = build_scheduler(optimizer, cfg, stage.steps)
        model, optimizer = acc.prepare(unwrapped, optimizer)
        self.built, self.stage = True, stage_index
        described = controls.describe_groups(groups, params)
        build = {"step": step, "stage": stage_index, "stage_steps": [stage.start + 1, stage.end],
                 "top_blocks": (stage.top_blocks if stage.top_blocks is not None else "all") if self.staged else None,
                 "trainable_tensors": sum(g["tensors"] for g in described),
                 "trainable_params": sum(g["params"] for g in described), "groups": described}
        where = (f"unfreeze stage {stage_index + 1}/{len(self.stages)} (steps {stage.start + 1}-{stage.end}): "
                 if self.staged else "")
        acc.print(f"ftl: optimizer {where}{build['trainable_params']:,} parameters in {len(described)} "
                  f"group{'s' if len(described) != 1 else ''}: {controls.groups_line(described)}")
        _append_to_manifest(acc, self.run_dir, "optimizer_builds", build)
        return model, optimizer, build


class _SchedulerSlot:
    """A stable checkpointing handle for whichever scheduler the current stage uses."""

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
    total = opt.total
    stopper = controls.EarlyStopping(cfg.early_stopping)
    if stopper.enabled and evaluate is None:
        raise RecipeError("train.early_stopping.metric: this stage has no validation evaluation to stop on")

    step, result, saved = 0, FitResult(steps=total), {}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = read_state(ckpt)
        step = saved["step"]
    # the stage whose optimizer the checkpoint holds (a checkpoint at a boundary holds the earlier stage's)
    stage = saved.get("unfreeze_stage", controls.stage_of_step(opt.stages, step))
    model, optimizer, build = opt.build(model, stage, step)
    result.optimizer_builds.append(build)
    if ckpt is not None:
        load_checkpoint(accelerator, ckpt)
        stopper.restore(saved.get("early_stopping"))
        result.resumed_from = step
        accelerator.print(f"ftl: resumed from {ckpt} (step {step} of {total})")
    elif before_training is not None:
        before_training(model)

    stop = StopRequest().install()
    world = accelerator.num_processes
    per_epoch = controls.micro_batches_per_epoch(len(features), cfg.batch_size, world)
    batches = micro_batches(len(features), cfg.batch_size, world, accelerator.process_index, cfg.seed)
    for _ in range(step * cfg.grad_accum):  # skip what the checkpointed run had consumed
        next(batches)

    bar = _progress(total, step, enabled=progress and accelerator.is_main_process)
    model.train()
    while step < total and not stopper.stopped:
        if (upcoming := controls.stage_for_next_step(opt.stages, step)) != opt.stage:
            model, optimizer, build = opt.build(model, upcoming, step)
            result.optimizer_builds.append(build)
            model.train()
        started, losses, tokens, targets = time.perf_counter(), [], 0, 0
        for _ in range(cfg.grad_accum):
            epoch, indices = next(batches)
            rows = [features[i] for i in indices]
            batch = {k: v.to(accelerator.device) for k, v in collate(rows).items()}
            with accelerator.accumulate(model):
                loss, n_targets = loss_fn(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.grad_clip:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                if accelerator.sync_gradients:
                    opt.scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float())
            tokens += sum(len(v) for r in rows for k, v in r.items() if k.endswith("input_ids"))  # no padding
            targets += n_targets
        step += 1
        stats = torch.tensor([torch.stack(losses).mean().item(), float(tokens), float(targets)],
                             device=accelerator.device)
        stats = accelerator.reduce(stats, reduction="sum") if accelerator.num_processes > 1 else stats
        record = {"step": step, "epoch": epoch, "loss": stats[0].item() / accelerator.num_processes,
                  "lr": opt.lr(), "tokens": int(stats[1].item()),
                  "trained_tokens": int(stats[2].item()),
                  "step_time": time.perf_counter() - started}
        if opt.staged:
            record["unfreeze_stage"] = opt.stage
        if step % cfg.log_every == 0 or step == total:
            log(record)
            result.history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        epoch_end = (step * cfg.grad_accum) // per_epoch > ((step - 1) * cfg.grad_accum) // per_epoch or step == total
        evaluated = None
        if stopper.enabled and epoch_end:
            evaluated = _epoch_evaluation(accelerator, model, evaluate, stopper, step,
                                          math.ceil(step * cfg.grad_accum / per_epoch), log, run_dir, save_model)
            model.train()
        if evaluate is not None and eval_every and step % eval_every == 0 and step < total and evaluated is None:
            log({"step": step, **{f"eval/{k}": v for k, v in evaluate(model).items()}})
            model.train()
        stopping = stop.agreed(accelerator)
        if (stopping or (cfg.save_every and step % cfg.save_every == 0) or step == total or stopper.stopped
                or evaluated is not None):
            state = {"step": step, "total": total, "unfreeze_stage": opt.stage}
            if stopper.enabled:
                state["early_stopping"] = stopper.state()
            save_checkpoint(accelerator, run_dir, step, state, keep=cfg.keep_checkpoints)
        if stopper.stopped:
            accelerator.print(f"ftl: early stopping at step {step}: validation {cfg.early_stopping.metric} did not "
                              f"improve for {cfg.early_stopping.patience} epochs (best {stopper.best:.6g} at epoch "
                              f"{stopper.best_epoch}, kept in {run_dir / BEST_DIR})")
            result.stopped_early = True
            break
        if stopping and step < total:
            accelerator.print(f"ftl: {stop.signal_name or 'stop signal'} received: checkpoint saved at "
                              f"step {step}; rerun with --resume to continue")
            result.interrupted = True
            break
    if bar is not None:
        bar.close()
    result.steps = step
    if stopper.enabled:
        result.early_stopping = stopper.state()
        result.stopped_early = stopper.stopped
    return model, result


def _epoch_evaluation(accelerator, model, evaluate, stopper, step: int, epoch: int, log, run_dir: Path,
                      save_model) -> dict:
    """Evaluate at an epoch end; on improvement write best/ (before the checkpoint that records it, so a
    kill in between redoes the epoch and rewrites the same best/)."""
    metrics = evaluate(model)
    value = stopper.value_from(metrics)
    improved = stopper.update(value, epoch, step)
    log({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}})
    if improved:
        _save_best(accelerator, model, run_dir, save_model,
                   {"epoch": epoch, "step": step, "metric": stopper.cfg.metric, "value": value})
    state = stopper.state()
    accelerator.print(f"ftl: epoch {epoch} (step {step}): validation {stopper.cfg.metric} {value:.6g}"
                      f"{' (best so far)' if improved else f', no improvement for {stopper.bad_epochs} epoch(s)'}")
    _set_in_manifest(accelerator, run_dir, "early_stopping", {k: v for k, v in state.items() if k != "history"})
    return metrics


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
        from ftl.track.manifest import update_manifest

        update_manifest(path, **{key: json.loads(path.read_text()).get(key, []) + [value]})


def _set_in_manifest(accelerator, run_dir: Path, key: str, value) -> None:
    path = run_dir / MANIFEST_FILE
    if accelerator.is_main_process and path.exists():
        from ftl.track.manifest import update_manifest

        update_manifest(path, **{key: value})


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
