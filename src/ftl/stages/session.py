"""What every stage does around its training: the run directory, data, tokenizer, base model and method,
the call into the shared loop, manifest, tracking, final save and report.

A loop-trained stage reads, top to bottom:

    session = RunSession(recipe, run_dir, resume)
    splits, tokenizer = session.open()                   # data + tokenizer
    train = ...encode...(tokenizer, splits.train)        # the stage's own features
    rows = session.training_rows(train)                  # packed when the method allows it
    model = session.prepare_model(tokenizer)             # base (quantised as the method needs) + method
    model, result = session.fit(model, rows, collate, loss_fn, evaluate)
    return session.finish(model, tokenizer, result, final_evaluation)

`prepare_model` writes the manifest and opens `self.log` (the metrics sink) once the trainable
parameters are known. Stages add their own manifest entries through `record`. Only the main process
writes files.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Callable, Optional

from accelerate.utils import broadcast_object_list, set_seed

from ftl import run_dir as layout
from ftl.config import resolved_dict, save_resolved
from ftl.config.schema import FORMAT_KINDS, Recipe
from ftl.config.stages import STAGES, stage_problems
from ftl.console import hide_weight_bars, metrics_line, save_console
from ftl.data import load_splits
from ftl.data.chat_templates import load_chat_template, template_manifest, untokenized_markers
from ftl.data.packing import pack_sequences
from ftl.errors import DataError, FtlError
from ftl.evaluate.report import write_report
from ftl.methods import METHODS, STORES_FROZEN_16BIT, apply_method, save_trained, trainable_summary
from ftl.models.attention import check_attention, packs_rows
from ftl.models.load import base_model_dir, load_model, load_tokenizer, model_origin, record_texts
from ftl.plan import (CheckpointingChoice, DataLengths, checkpointing_choice, measured_lengths, model_shape,
                      plan_with_checkpointing, recipe_setup)
from ftl.run_dir import ensure_run_dir
from ftl.run_lock import RunLock, RunLocked
from ftl.track.manifest import update_manifest, write_manifest
from ftl.track.memory import MemoryProbe, release_freed_memory, summarise
from ftl.track.metrics import MetricsLog
from ftl.track.plot import plot_curves
from ftl.track.wandb_run import WandbSink
from ftl.train.checkpoint import resume_point
from ftl.train.controls import apply_freeze, check_loop_controls, trainable_names
from ftl.train.distributed import describe_runtime, is_sharded, make_accelerator, rank_checks
from ftl.train.host_allocator import apply_host_allocator
from ftl.train.loop import FitResult, LossFn, fit
from ftl.train.resume_contract import check_resume, check_resume_step, make_contract, read_contract, write_contract

Metrics = Callable[[Any], dict]  # evaluate(model) -> validation metrics


class RunSession:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool):
        self.recipe, self.run_dir, self.resume = recipe, Path(run_dir), resume
        check_loop_controls(recipe)
        check_attention(recipe)
        allocator = apply_host_allocator(recipe.train.host_allocator)  # before the data and models exist
        self.accelerator = make_accelerator(recipe.train, recipe.launch)
        self.main = self.accelerator.is_main_process
        self.memory = MemoryProbe(self.accelerator.device)
        self.memory.mark("start")  # the runtime: Python, torch, transformers, accelerate imported
        hide_weight_bars()
        set_seed(recipe.train.seed)
        self._take_run_lock()
        self.resume_step = resume_point(self.run_dir, self.accelerator.print) if resume else None
        self.sinks, self.wandb = [], None
        self.shape, self.lengths = None, DataLengths()
        self.manifest_fields: dict = {"world_size": self.accelerator.num_processes, "stage": recipe.stage,
                                      "profile": recipe.profile, "resumed_from_step": self.resume_step,
                                      "runtime": describe_runtime(self.accelerator),  # what really runs
                                      "main_process_port": int(os.environ.get("MASTER_PORT") or 0) or None,
                                      "host_allocator": allocator}

    def _take_run_lock(self) -> None:
        """The main process locks the run directory; every rank learns the outcome (ranks share the
        lock), so a refused run stops on every rank instead of leaving the others in a barrier."""
        outcome = None
        if self.main:
            try:
                ensure_run_dir(self.run_dir)
                note = RunLock(self.run_dir).acquire()
                if note:
                    print(note, flush=True)
            except FtlError as err:
                outcome = (type(err).__name__, str(err))
        if self.accelerator.num_processes > 1:
            outcome = broadcast_object_list([outcome])[0]
        if outcome is not None:
            raise {"RunLocked": RunLocked}.get(outcome[0], FtlError)(outcome[1])

    def record(self, key: str, value) -> None:
        """A stage's own manifest entry (written with the manifest when the method is applied)."""
        self.manifest_fields[key] = value

    # -- data and model ----------------------------------------------------------------------
    def open(self):
        """(splits, tokenizer): the recipe's data, and the tokenizer built or loaded for it. Only once the
        recipe and data have validated does anything in the run directory change: a resume is checked
        against the run's contract, a fresh run replaces the outputs of a run it was allowed to replace."""
        splits = self.load_data()
        # read and checked on every rank before the run folder changes; a resume keeps its saved tokenizer
        template = self.recipe.data.chat_template
        self.chat_template = load_chat_template(template) if template and not self.resume else None
        choice = self.resolve_checkpointing(splits)  # before the contract: it holds the resolved choice
        contract = make_contract(resolved_dict(self.recipe), splits.fingerprints())
        if self.resume:
            check_resume(self.run_dir, contract)
            if self.recipe.train.max_steps is not None:  # else fit checks, once it knows the length
                check_resume_step(self.resume_step, self.recipe.train.max_steps, self.run_dir, lambda _: None)
        if self.main:
            if not self.resume:
                if (self.run_dir / layout.METRICS_FILE).exists():  # an earlier run's (the runner allowed it)
                    for name in layout.RUN_OUTPUTS:
                        shutil.rmtree(self.run_dir / name, ignore_errors=True)
                write_contract(self.run_dir, contract)
            save_resolved(self.recipe, self.run_dir / layout.RECIPE_FILE)
        save_console(self.run_dir / layout.RUN_LOG, self.main, fresh=not self.resume)
        acc = self.accelerator
        acc.print(f"ftl: run folder {self.run_dir} ({self.recipe.name}, profile {self.recipe.profile or 'none'}, "
                  f"{acc.num_processes} process{'es' if acc.num_processes > 1 else ''} on {acc.device.type}{', resuming' if self.resume else ''})")
        acc.print(choice.line())
        acc.wait_for_everyone()
        tokenizer = self.tokenizer(splits.train)
        self.memory.mark("data")  # + the data and tokenizer: the baseline before any model loads
        return splits, tokenizer

    def resolve_checkpointing(self, splits) -> CheckpointingChoice:
        """model.gradient_checkpointing as this run uses it. `auto` is decided by the plan for the rows this
        run's data gives (so `ftl plan --data` shows the same choice), or on --resume taken from the run's
        contract (the same choice even if the rule changed since). The recipe then holds the resolved bool:
        the model loader, the methods, TRL's arguments, the resolved recipe and the resume contract all read
        that one value."""
        model = self.recipe.model
        choice = None
        if model.gradient_checkpointing == "auto" and self.resume:
            earlier = (read_contract(self.run_dir) or {}).get("recipe", {}).get("model.gradient_checkpointing")
            if isinstance(earlier, bool):
                choice = CheckpointingChoice(earlier, True, "auto: as the run being resumed chose (its "
                                             "resume_contract.json)")
        if choice is None:
            try:
                self.shape = model_shape(self.recipe)
                if model.gradient_checkpointing == "auto":
                    self.lengths = self.data_lengths(splits)
                choice = checkpointing_choice(self.recipe, self.shape, self.lengths)
            except Exception as err:  # noqa: BLE001 - an estimate must not stop a run; the manifest says why
                self.shape = None
                on = model.gradient_checkpointing is True
                choice = CheckpointingChoice(on, model.gradient_checkpointing == "auto",
                                             f"{'auto: off, ' if model.gradient_checkpointing == 'auto' else ''}"
                                             f"the plan could not be computed ({type(err).__name__}: {err})")
        model.gradient_checkpointing = choice.on
        self.manifest_fields["gradient_checkpointing"] = choice.as_manifest()
        return choice

    def data_lengths(self, splits) -> DataLengths:
        """The longest rows the data gives, tokenised as the stage will; data.max_length's rows (unknown
        lengths) if they cannot be measured, which the choice's reason then says."""
        try:
            tokenizer = load_tokenizer(self.recipe.model, record_texts(splits.train), chat_template=self.chat_template)
            return measured_lengths(self.recipe, splits, tokenizer)
        except Exception as err:  # noqa: BLE001 - the stage reports bad data itself, with its own error
            self.accelerator.print(f"ftl: note: the data's lengths could not be measured ({type(err).__name__}: "
                                   f"{err}); gradient checkpointing is decided for data.max_length")
            return DataLengths()

    def note_lengths(self, **lengths: int) -> None:
        """The longest rows the stage's data gives (train, eval, prompt tokens): what the planned peak in the
        manifest is computed for."""
        self.lengths = replace(self.lengths, **lengths)

    def note_prompt_lengths(self, tokenizer, prompts: list[str]) -> None:
        """RL stages: the longest prompt in tokens, which generation's and the update's rows are planned at
        (already measured, the same way, when `auto` was decided from the data)."""
        if self.lengths.prompt is None:
            self.note_lengths(prompt=max((len(ids) for ids in tokenizer(prompts, add_special_tokens=False).input_ids),
                                         default=0))

    def planned_memory(self) -> Optional[dict]:
        """`ftl plan`'s peak for this run's data lengths and resolved checkpointing (None without a shape)."""
        if self.shape is None:
            try:
                self.shape = model_shape(self.recipe)
            except Exception as err:  # noqa: BLE001 - an estimate must not stop a run
                return {"error": f"{type(err).__name__}: {err}"}
        try:
            setup = recipe_setup(self.recipe)
            est, _, work = plan_with_checkpointing(self.recipe, self.shape, setup, self.lengths)
        except Exception as err:  # noqa: BLE001
            return {"error": f"{type(err).__name__}: {err}"}
        return {"peak_bytes": round(est.peak), "lengths": asdict(self.lengths),
                "rows": {"batch_size": work.batch_size, "seq_len": work.seq_len,
                         "eval_batch_size": work.eval_batch_size, "eval_seq_len": work.eval_seq_len,
                         "checkpointing": work.checkpointing},
                "terms": {k: round(v) for k, v in est.as_dict().items() if isinstance(v, float)}}

    def validation_records(self, splits) -> list[dict]:
        return splits.validation[: self.recipe.eval.max_examples]

    def test_records(self, splits) -> list[dict]:
        """The test split (hash-split or given in data.splits.test), scored by the end-of-run evaluation."""
        return splits.test[: self.recipe.eval.max_examples]

    def load_data(self):
        splits, report = load_splits(self.recipe.data)
        for source in report.sources:  # data.format auto: the stage learns what it got only now
            if source.format not in FORMAT_KINDS:  # auto on a source with no rows: its error comes below
                continue
            problems = stage_problems(self.recipe.stage, source.format, True, kind=FORMAT_KINDS[source.format])
            if problems:
                raise DataError(f"{source.key} ({source.origin}): {'; '.join(problems)}")
        self.record_kinds = report.kinds  # split -> kinds of record its sources gave (data.format may be auto)
        self.manifest_fields["data"] = {"fingerprints": splits.fingerprints(), "sizes": splits.sizes(),
                                        "duplicates_dropped": splits.duplicates_dropped, **report.as_manifest()}
        if self.main:
            for line in report.notes():
                print(line, flush=True)
            if report.skipped:
                print(f"ftl: skipped {sum(report.skipped.values())} bad rows: {dict(report.skipped)}", flush=True)
        return splits

    def note_data(self, **fields) -> None:
        self.manifest_fields["data"].update(fields)

    def tokenizer(self, train_records: list[dict]):
        """Built once on the main process and saved, so every rank, resume and eval share it."""
        saved = self.run_dir / layout.TOKENIZER_DIR
        with self.accelerator.main_process_first():
            reuse = saved if (self.resume or not self.main) else None
            tokenizer = load_tokenizer(self.recipe.model, record_texts(train_records), saved=reuse,
                                       chat_template=self.chat_template)
            if self.main and reuse is None:
                tokenizer.save_pretrained(saved)
        if self.chat_template is not None and self.recipe.model.source != "tiny" and self.main:
            for marker in untokenized_markers(tokenizer, self.chat_template):
                print(f"ftl: note: data.chat_template {self.chat_template.origin} writes {marker}, which the "
                      "model's tokenizer has no token for: it trains as plain text", flush=True)
        self.manifest_fields["chat_template"] = template_manifest(self.recipe.data.chat_template, tokenizer)
        return tokenizer

    def base_dir(self, tokenizer) -> Path:
        with self.accelerator.main_process_first():
            folder = base_model_dir(self.recipe.model, tokenizer, self.recipe.train.seed, self.run_dir)
        self.manifest_fields["model"] = model_origin(self.recipe.model, folder)  # a hub model: id, revision, commit
        return folder

    def load_base(self, tokenizer, head: str = "causal_lm", num_labels: int = 1):
        """The base model, quantised as the recipe's method needs (QLoRA: 4-bit, lora8bit: 8-bit)."""
        base_dir = self.base_dir(tokenizer)  # a fresh tiny run builds it here, drawing from the global generator
        # ...so reseed: a fresh run and its resume (and every rank) must draw the same new head and adapter
        # init, since a checkpoint leaves the frozen ones (a frozen new head, PEFT's original copy of it) to
        # this rebuild
        set_seed(self.recipe.train.seed)
        model = load_model(self.recipe.model, base_dir, METHODS[self.recipe.method.kind].quant_bits,
                           self.recipe.method.quant, head=head, num_labels=num_labels)
        if head != "causal_lm":
            model.config.pad_token_id = tokenizer.pad_token_id
        return model

    def prepare_model(self, tokenizer, head: str = "causal_lm", num_labels: int = 1):
        """load_base + apply_method: what trains."""
        task = "CAUSAL_LM" if head == "causal_lm" else "SEQ_CLS"
        return self.apply_method(self.load_base(tokenizer, head, num_labels), task_type=task)

    def packs(self) -> bool:
        """data.packing, for a stage that packs (STAGES), unless the method puts virtual tokens at the start
        of each row."""
        recipe = self.recipe
        packing = packs_rows(recipe)
        if recipe.data.packing and STAGES[recipe.stage].packs and not packing:
            self.accelerator.print(f"ftl: method {recipe.method.kind} puts virtual tokens at the start of each row: "
                                   "training without packing")
        return packing

    def training_rows(self, features: list[dict], encoding=None) -> list[dict]:
        """The rows the loop trains on: features packed into data.max_length rows when allowed; the
        manifest records examples, rows, whether they were packed and (given the encoding report) how many
        examples were truncated or dropped. No example left to train on is refused here."""
        if not features:
            counts = f" ({encoding.as_dict()})" if encoding is not None else ""
            raise DataError(f"data: no training example is left after tokenising{counts}: every one was cut at "
                            f"data.max_length={self.recipe.data.max_length} before anything to learn; raise "
                            "data.max_length or shorten the prompts")
        packing = self.packs()
        rows = pack_sequences(features, self.recipe.data.max_length) if packing else features
        self.note_lengths(train=longest(rows), eval=longest(features))
        self.note_data(examples=len(features), train_rows=len(rows), packed=packing,
                       **(encoding.as_dict() if encoding is not None else {}))
        return rows

    def training_autocast_dtype(self) -> Optional[str]:
        """"bfloat16" where every forward of the model that trains runs under bf16 autocast: an SFT stage (its
        loss and evaluation go through the prepared model) or PPO (updates through the prepared model, each
        rollout under the run's autocast) at train.precision bf16 without DeepSpeed (which casts the weights
        itself). The method may then store frozen weights in bf16 (memory and per-forward casts, not numerics)."""
        acc = self.accelerator
        if self.recipe.stage not in STORES_FROZEN_16BIT or acc.mixed_precision != "bf16" or \
                acc.state.deepspeed_plugin is not None:
            return None
        return "bfloat16"

    def apply_method(self, model, task_type: str = "CAUSAL_LM"):
        self.accelerator.print(data_line(self.manifest_fields["data"], self.recipe.data.max_length))
        model = apply_method(model, self.recipe.method, self.recipe.model.gradient_checkpointing, task_type,
                             autocast_dtype=self.training_autocast_dtype())
        frozen = apply_freeze(model, self.recipe.train.freeze)  # train.freeze, on top of the method
        summary = trainable_summary(model)
        summary["frozen_by_train_freeze"] = len(frozen)
        summary["names"] = trainable_names(model)
        self.manifest_fields["trainable"] = summary
        self.accelerator.print(f"ftl: method {self.recipe.method.kind}: {summary['trainable_params']:,} of "
                               f"{summary['total_params']:,} parameters train "
                               f"({100 * summary['trainable_share']:.2f}%)")
        self.memory.mark("model")
        self._start_tracking()
        return model

    def fit(self, model, tokenizer, rows: list[dict], collate: Callable[[list[dict]], dict], loss_fn: LossFn,
            evaluate: Optional[Metrics] = None, evaluate_before: Optional[Metrics] = None):
        """The shared loop on the recipe's train settings; `evaluate_before` (default `evaluate`) is the
        untrained model's evaluation when eval.before_training asks for it."""
        return fit(accelerator=self.accelerator, model=model, cfg=self.recipe.train, features=rows, collate=collate,
                   loss_fn=loss_fn, run_dir=self.run_dir, log=self.log, resume=self.resume,
                   before_training=self.evaluation_before(evaluate_before or evaluate), evaluate=evaluate,
                   eval_every=self.recipe.eval.every, save_model=self.model_saver(tokenizer))

    def model_saver(self, tokenizer) -> Callable:
        """save(model, folder): the same kind of folder as final/ (for the loop's best/ copy)."""
        return lambda model, target: save_final_model(self.accelerator, model, tokenizer, target,
                                                      self.recipe.method)

    # -- tracking --------------------------------------------------------------------------
    def _start_tracking(self) -> None:
        self.manifest_fields["planned_memory"] = self.planned_memory()
        if self.main:
            write_manifest(self.run_dir / layout.MANIFEST_FILE, keep_attempts=self.resume, **self.manifest_fields)
            if self.recipe.track.wandb.enabled:
                self.wandb = WandbSink(self.recipe.track.wandb, self.run_dir,
                                       f"{self.recipe.name}-{self.recipe.profile or 'base'}",
                                       resolved_dict(self.recipe), self.recipe.stage)
                self.sinks.append(self.wandb)
        self.log = MetricsLog(self.run_dir / layout.METRICS_FILE, self.main, self.resume_step, self.sinks)

    def evaluation_before(self, evaluate: Optional[Metrics]) -> Optional[Callable[[Any], None]]:
        """The untrained model's evaluation (eval.before_training), for `fit` to run once it has prepared
        the model: under ZeRO-3 an unprepared model holds only this rank's shards. None on resume: the
        run being resumed measured it."""
        if evaluate is None or not self.recipe.eval.before_training or self.resume_step is not None:
            return None

        def run(model) -> None:
            metrics = evaluate(model)
            self.accelerator.print(metrics_line("before training", metrics))
            if self.main:
                (self.run_dir / layout.EVAL_BEFORE_FILE).write_text(json.dumps(metrics, ensure_ascii=False))
        return run

    # -- the end ---------------------------------------------------------------------------
    def record_memory(self) -> dict:
        """Every rank's peak (a collective), the max over ranks into the manifest's `memory`, and one line."""
        from accelerate.utils import gather_object

        record = self.memory.rank_record()
        per_rank = gather_object([record]) if self.accelerator.num_processes > 1 else [record]
        memory = summarise(per_rank, self.memory.measure, self.manifest_fields.get("planned_memory"))
        if self.main:
            update_manifest(self.run_dir / layout.MANIFEST_FILE, memory=memory)
            planned = (memory.get("planned") or {}).get("peak_bytes")
            print(f"ftl: peak memory {memory['peak_bytes'] / 2**30:.2f} GiB ({memory['measure']}, max over "
                  f"{len(per_rank)} rank{'s' if len(per_rank) > 1 else ''}"
                  + (f"; planned {planned / 2**30:.2f} GiB, {100 * memory['planned_error']:+.0f}%" if planned else "")
                  + ")", flush=True)
        return memory

    def finish(self, model, tokenizer, result: FitResult, evaluate: Callable[[], dict],
               part: Optional[str] = None) -> dict:
        """part: save only this submodule of the trained module (e.g. PPO's policy inside its ZeRO engine)."""
        acc = self.accelerator
        summary = {"run_dir": str(self.run_dir), "steps": result.steps, "interrupted": result.interrupted}
        self.memory.mark("trained")
        if result.interrupted:
            self.record_memory()
            self.log.close()
            return summary
        release_freed_memory()  # training's freed activations: not resident under evaluation's buffers
        after = evaluate()
        acc.print(metrics_line("after training", after))
        checks = rank_checks(acc, model)
        if len({c["param_digest"] for c in checks}) > 1 and not is_sharded(acc):
            acc.print(f"ftl: WARNING: ranks ended with different weights: {checks}")
        save_final_model(acc, model, tokenizer, self.run_dir / layout.FINAL_DIR, self.recipe.method, part)
        self.memory.mark("end")
        summary["memory"] = self.record_memory()
        if self.main:
            results = {}
            before_path = self.run_dir / layout.EVAL_BEFORE_FILE
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
            print(f"ftl: report {md_path} | metrics {self.run_dir / layout.METRICS_FILE} | plot {plot} "
                  f"| model {self.run_dir / layout.FINAL_DIR}", flush=True)
            summary.update(report=str(json_path), plot=str(plot) if plot else None, after=after)
        acc.wait_for_everyone()
        return summary


def longest(features: list[dict]) -> int:
    """The longest token row of features (any *input_ids field: a preference pair's chosen and rejected)."""
    return max((len(v) for f in features for k, v in f.items() if k.endswith("input_ids")), default=0)


def data_line(data: dict, max_length: int) -> str:
    """The run's data on one line, from what the manifest records (splits, rows, encoding)."""
    sizes = data.get("sizes", {})
    parts = [" / ".join(f"{sizes.get(k, 0)} {k}" for k in ("train", "validation", "test")) + " examples"]
    if "train_rows" in data:
        kind = "packed rows" if data.get("packed") else "rows"
        parts[0] += f" -> {data['train_rows']} {kind} (max_length {max_length})"
    skipped = sum((data.get("rows") or {}).get("skipped", {}).values())
    notes = [f"{data.get('duplicates_dropped', 0)} duplicates dropped", f"{skipped} bad rows skipped"]
    if "truncated" in data:
        notes.append(f"{data['truncated']} truncated")
    if data.get("dropped_nothing_to_learn"):
        notes.append(f"{data['dropped_nothing_to_learn']} dropped with nothing to learn")
    return f"ftl: data: {parts[0]}; {', '.join(notes)}"


def save_final_model(accelerator, model, tokenizer, target: Path, method, part: Optional[str] = None) -> None:
    """A normal save_pretrained folder (the adapter alone for adapter methods), written atomically."""
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards on every rank
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if part:
            unwrapped = getattr(unwrapped, part)
            state_dict = {k[len(part) + 1:]: v for k, v in state_dict.items() if k.startswith(part + ".")}
        tmp = layout.partial(target)
        shutil.rmtree(tmp, ignore_errors=True)
        save_trained(unwrapped, state_dict, tmp, method)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    accelerator.wait_for_everyone()
