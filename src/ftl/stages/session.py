"""What every stage does around its training: the run directory, manifest, tracking, final save, report.

A stage creates a RunSession, asks it for data and a tokenizer, applies its method through
`apply_method` (which writes the manifest and opens `self.log`, the metrics sink, once the trainable
parameters are known), trains, and hands the result to `finish`. Only the main process writes files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from ftl import run_dir as layout
from ftl.config import save_resolved
from ftl.config.schema import Recipe
from ftl.data import load_splits
from ftl.evaluate.report import write_report
from ftl.methods import apply_method, save_trained, trainable_summary
from ftl.models.load import base_model_dir, load_tokenizer, record_texts
from ftl.track.manifest import update_manifest, write_manifest
from ftl.track.metrics import MetricsLog
from ftl.track.plot import plot_curves
from ftl.train.checkpoint import latest_checkpoint
from ftl.train.controls import apply_freeze, check_loop_controls, trainable_names
from ftl.train.distributed import is_sharded, make_accelerator, rank_checks

BEFORE_FILE = "eval_before.json"


class RunSession:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool):
        from accelerate.utils import set_seed

        self.recipe, self.run_dir, self.resume = recipe, run_dir, resume
        check_loop_controls(recipe)
        self.accelerator = make_accelerator(recipe.train, recipe.launch)
        self.main = self.accelerator.is_main_process
        set_seed(recipe.train.seed)
        checkpoint = latest_checkpoint(run_dir) if resume else None
        self.resume_step = int(checkpoint.name.split("-")[1]) if checkpoint else None
        if self.main:
            if not resume and (run_dir / layout.METRICS_FILE).exists():
                # A fresh run in a used directory: start clean rather than mix two runs' files.
                for name in ("checkpoints", layout.FINAL_DIR, layout.TOKENIZER_DIR, "base", "wandb", "best"):
                    shutil.rmtree(run_dir / name, ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(recipe, run_dir / layout.RECIPE_FILE)
        self.accelerator.wait_for_everyone()
        self.sinks, self.wandb = [], None
        self.manifest_fields: dict = {"world_size": self.accelerator.num_processes, "stage": recipe.stage,
                                      "profile": recipe.profile, "resumed_from_step": self.resume_step}

    # -- data and model ----------------------------------------------------------------------
    def load_data(self):
        splits, report = load_splits(self.recipe.data)
        self.manifest_fields["data"] = {"fingerprints": splits.fingerprints(), "sizes": splits.sizes(),
                                        "duplicates_dropped": splits.duplicates_dropped,
                                        "rows": report.as_dict()}
        if report.skipped and self.main:
            print(f"ftl: skipped {sum(report.skipped.values())} bad rows: {dict(report.skipped)}", flush=True)
        return splits

    def note_data(self, **fields) -> None:
        self.manifest_fields["data"].update(fields)

    def tokenizer(self, train_records: list[dict]):
        """Built once on the main process and saved, so every rank, resume and eval share it."""
        saved = self.run_dir / layout.TOKENIZER_DIR
        with self.accelerator.main_process_first():
            reuse = saved if (self.resume or not self.main) else None
            tokenizer = load_tokenizer(self.recipe.model, record_texts(train_records), saved=reuse)
            if self.main and reuse is None:
                tokenizer.save_pretrained(saved)
        return tokenizer

    def base_dir(self, tokenizer) -> Path:
        with self.accelerator.main_process_first():
            return base_model_dir(self.recipe.model, tokenizer, self.recipe.train.seed, self.run_dir)

    def apply_method(self, model, task_type: str = "CAUSAL_LM"):
        model = apply_method(model, self.recipe.method, self.recipe.model.gradient_checkpointing, task_type)
        frozen = apply_freeze(model, self.recipe.train.freeze)  # train.freeze, on top of the method
        summary = trainable_summary(model)
        summary["frozen_by_train_freeze"] = len(frozen)
        summary["names"] = trainable_names(model)
        self.manifest_fields["trainable"] = summary
        self.accelerator.print(f"ftl: method {self.recipe.method.kind}: {summary['trainable_params']:,} of "
                               f"{summary['total_params']:,} parameters train "
                               f"({100 * summary['trainable_share']:.2f}%)")
        self._start_tracking()
        return model

    def model_saver(self, tokenizer) -> Callable:
        """save(model, folder): the same kind of folder as final/ (for the loop's best/ copy)."""
        return lambda model, target: save_final_model(self.accelerator, model, tokenizer, target,
                                                      self.recipe.method)

    # -- tracking --------------------------------------------------------------------------
    def _start_tracking(self) -> None:
        if self.main:
            write_manifest(self.run_dir / layout.MANIFEST_FILE, **self.manifest_fields)
            if self.recipe.track.wandb.enabled:
                from ftl.config import resolved_dict
                from ftl.track.wandb_run import WandbSink

                self.wandb = WandbSink(self.recipe.track.wandb, self.run_dir,
                                       f"{self.recipe.name}-{self.recipe.profile or 'base'}",
                                       resolved_dict(self.recipe))
                self.sinks.append(self.wandb)
        self.log = MetricsLog(self.run_dir / layout.METRICS_FILE, self.main, self.resume_step, self.sinks)

    def evaluation_before(self, evaluate: Callable[[Any], dict]) -> Optional[Callable[[Any], None]]:
        """The untrained model's evaluation (eval.before_training), for `fit` to run once it has prepared
        the model: under ZeRO-3 an unprepared model holds only this rank's shards. None on resume: the
        run being resumed measured it."""
        if not self.recipe.eval.before_training or self.resume_step is not None:
            return None

        def run(model) -> None:
            metrics = evaluate(model)
            if self.main:
                (self.run_dir / BEFORE_FILE).write_text(json.dumps(metrics, ensure_ascii=False))
        return run

    # -- the end ---------------------------------------------------------------------------
    def finish(self, model, tokenizer, result, evaluate: Callable[[], dict], part: Optional[str] = None) -> dict:
        """part: save only this submodule of the trained module (e.g. PPO's policy inside its ZeRO engine)."""
        acc = self.accelerator
        summary = {"run_dir": str(self.run_dir), "steps": result.steps, "interrupted": result.interrupted}
        if result.interrupted:
            self.log.close()
            return summary
        after = evaluate()
        checks = rank_checks(acc, model)
        if len({c["param_digest"] for c in checks}) > 1 and not is_sharded(acc):
            acc.print(f"ftl: WARNING: ranks ended with different weights: {checks}")
        save_final_model(acc, model, tokenizer, self.run_dir / layout.FINAL_DIR, self.recipe.method, part)
        if self.main:
            results = {}
            before_path = self.run_dir / BEFORE_FILE
            if before_path.exists():
                results["before"] = json.loads(before_path.read_text())
            results["after"] = after
            json_path, md_path = write_report(self.run_dir, results)
            self.log.close()
            plot = plot_curves(self.run_dir / layout.METRICS_FILE, self.run_dir / layout.PLOT_FILE,
                               f"{self.recipe.name} ({self.recipe.profile or 'base'})") \
                if self.recipe.track.plot else None
            update_manifest(self.run_dir / layout.MANIFEST_FILE, finished=True, steps=result.steps,
                            rank_checks=checks)
            if self.wandb:
                self.wandb.run.summary.update({f"final/{k}": v for k, v in after.items()
                                               if isinstance(v, (int, float))})
                self.wandb.finish()
            print(md_path.read_text(), flush=True)
            print(f"ftl: report {md_path} | metrics {self.run_dir / layout.METRICS_FILE} | plot {plot} "
                  f"| model {self.run_dir / layout.FINAL_DIR}", flush=True)
            summary.update(report=str(json_path), plot=str(plot) if plot else None, after=after)
        acc.wait_for_everyone()
        return summary


def save_final_model(accelerator, model, tokenizer, target: Path, method, part: Optional[str] = None) -> None:
    """A normal save_pretrained folder (the adapter alone for adapter methods), written atomically."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards on every rank
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if part:
            unwrapped = getattr(unwrapped, part)
            state_dict = {k[len(part) + 1:]: v for k, v in state_dict.items() if k.startswith(part + ".")}
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(unwrapped, state_dict, tmp, method)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    accelerator.wait_for_everyone()


def exit_cleanly(code: int = 0) -> None:
    """Flush and leave without interpreter teardown (avoids DeepSpeed's sporadic exit SIGABRT)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
