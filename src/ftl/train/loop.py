"""The training loop every stage shares.

Deterministic data order (seed + epoch), so a resumed run skips exactly the micro-batches it had
consumed and reproduces the uninterrupted loss curve. Each rank takes its slice of every global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ftl.config.schema import TrainConfig
from ftl.errors import DataError
from ftl.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from ftl.train.distributed import offloads_optimizer
from ftl.train.signals import StopRequest

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]]  # (mean loss, targets counted)


BNB_OPTIMIZERS = {"adamw_8bit": "AdamW8bit", "paged_adamw": "PagedAdamW", "paged_adamw_8bit": "PagedAdamW8bit"}


@dataclass
class FitResult:
    steps: int
    interrupted: bool = False
    resumed_from: Optional[int] = None
    history: list[dict] = field(default_factory=list)


def build_optimizer(model, cfg: TrainConfig, param_groups=None, offloaded: bool = False):
    params = param_groups or [p for p in model.parameters() if p.requires_grad]
    if offloaded:  # ZeRO-Offload steps on the CPU with DeepSpeed's own Adam (compiled once, cached)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        if cfg.optimizer != "adamw":
            raise ValueError("optimizer offload supports train.optimizer 'adamw' only")
        return DeepSpeedCPUAdam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                                adamw_mode=True)
    if cfg.optimizer in BNB_OPTIMIZERS:  # 8-bit / paged optimizers (paged ones fall back to unpaged on CPU)
        import bitsandbytes as bnb

        return getattr(bnb.optim, BNB_OPTIMIZERS[cfg.optimizer])(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas))


def build_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
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
    if cfg.max_steps:
        return cfg.max_steps
    per_epoch = max(1, n_examples // (cfg.batch_size * world))
    return max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))


def fit(*, accelerator, model, cfg: TrainConfig, features: list[dict], collate: Callable[[list[dict]], dict],
        loss_fn: LossFn, run_dir: Path, log: Callable[[dict], None], resume: bool = False,
        evaluate: Optional[Callable[[torch.nn.Module], dict]] = None, eval_every: Optional[int] = None,
        param_groups=None, progress: bool = True) -> tuple[torch.nn.Module, FitResult]:
    total = total_optimizer_steps(cfg, len(features), accelerator.num_processes)
    optimizer = build_optimizer(model, cfg, param_groups, offloaded=offloads_optimizer(accelerator))
    scheduler = build_scheduler(optimizer, cfg, total)
    model, optimizer = accelerator.prepare(model, optimizer)
    # Not prepared: accelerate would step it once per process, and our step count already
    # accounts for the world size. Registered so checkpoints carry its state.
    accelerator.register_for_checkpointing(scheduler)

    step, result = 0, FitResult(steps=total)
    if resume and (ckpt := latest_checkpoint(run_dir)) is not None:
        step = load_checkpoint(accelerator, ckpt)["step"]
        result.resumed_from = step
        accelerator.print(f"ftl: resumed from {ckpt} (step {step} of {total})")

    stop = StopRequest().install()
    batches = micro_batches(len(features), cfg.batch_size, accelerator.num_processes,
                            accelerator.process_index, cfg.seed)
    for _ in range(step * cfg.grad_accum):  # skip what the checkpointed run had consumed
        next(batches)

    bar = _progress(total, step, enabled=progress and accelerator.is_main_process)
    model.train()
    while step < total:
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
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float())
            tokens += sum(len(v) for r in rows for k, v in r.items() if k.endswith("input_ids"))  # no padding
            targets += n_targets
        step += 1
        stats = torch.tensor([torch.stack(losses).mean().item(), float(tokens), float(targets)],
                             device=accelerator.device)
        stats = accelerator.reduce(stats, reduction="sum") if accelerator.num_processes > 1 else stats
        record = {"step": step, "epoch": epoch, "loss": stats[0].item() / accelerator.num_processes,
                  "lr": scheduler.get_last_lr()[0], "tokens": int(stats[1].item()),
                  "trained_tokens": int(stats[2].item()),
                  "step_time": time.perf_counter() - started}
        if step % cfg.log_every == 0 or step == total:
            log(record)
            result.history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        if evaluate is not None and eval_every and step % eval_every == 0 and step < total:
            log({"step": step, **{f"eval/{k}": v for k, v in evaluate(model).items()}})
            model.train()
        stopping = stop.agreed(accelerator)
        if stopping or (cfg.save_every and step % cfg.save_every == 0) or step == total:
            save_checkpoint(accelerator, run_dir, step, {"step": step, "total": total},
                            keep=cfg.keep_checkpoints)
        if stopping and step < total:
            accelerator.print(f"ftl: {stop.signal_name or 'stop signal'} received: checkpoint saved at "
                              f"step {step}; rerun with --resume to continue")
            result.interrupted = True
            break
    if bar is not None:
        bar.close()
    result.steps = step
    return model, result


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
