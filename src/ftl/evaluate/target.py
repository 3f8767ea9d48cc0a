"""Evaluate a target, what `ftl eval TARGET` runs: a finished run directory or a bare model folder, scored
as its stage's kind of model (`by_stage.BY_STAGE`: language model, classifier, reward model, policy) on the
run's own split (`--split`, re-split deterministically from the run's data section) or on a given file
(`--data`, in `--format`, default the run's). Writes eval.json/eval.md and prints one summary line.
Imported only by that command, so torch and transformers load at module level.
"""

from __future__ import annotations

from pathlib import Path
from typing import get_args

import torch

from ftl import run_dir as layout
from ftl.config import load_recipe
from ftl.config.schema import FORMAT_KINDS, DataConfig, Recipe, RewardSource, ShareConfig
from ftl.console import metrics_line
from ftl.data import load_splits
from ftl.errors import FtlError
from ftl.evaluate.by_stage import BY_STAGE, POLICY, EvalJob, EvalKind
from ftl.evaluate.device import eval_device
from ftl.evaluate.report import write_report
from ftl.evaluate.target_models import folder_stage

SUFFIX_KIND = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
FORMATS = get_args(DataConfig.model_fields["format"].annotation)
FOLDER_NAMES = {"sft": "a language-model folder", "classify": "a sequence-classifier folder",
                "reward": "a reward-model folder (one-output sequence classifier)"}


def check_format(fmt: str | None, data: str | None) -> None:
    if fmt is not None and fmt not in FORMATS:
        raise FtlError(f"--format {fmt}: not a record format; one of {', '.join(FORMATS)}")
    if fmt and not data:
        raise FtlError("--format describes --data: give both (a run directory alone uses its own data)")


def data_config_for_file(path: str, fmt: str, like: DataConfig | None) -> DataConfig:
    """The file read whole, in `fmt`, tokenised like the run's data (max_length, system prompt): no split,
    no limit, and no share (a pipeline stage's share would silently drop most of the file's rows)."""
    p = Path(path)
    kind = SUFFIX_KIND.get(p.suffix) or ("saved_dataset" if p.is_dir() else None)
    if kind is None:
        raise FtlError(f"--data {path}: expected a .jsonl, .json, .csv, .parquet file or a saved dataset folder")
    base = like.model_dump() if like else {"format": fmt}
    base.update(source={"kind": kind, "path": str(p)}, sources=None, splits=None, format=fmt or base["format"],
                split={"validation": 0.0, "test": 0.0, "seed": 0}, share=ShareConfig().model_dump(), limit=None)
    return DataConfig.model_validate(base)


def open_target(path: Path) -> tuple[Recipe | None, str]:
    """(the run's resolved recipe or None for a model folder, the stage whose output it holds)."""
    if (path / layout.RECIPE_FILE).exists():
        recipe = load_recipe(path / layout.RECIPE_FILE)
        return recipe, recipe.stage
    if (path / "config.json").exists():
        return None, folder_stage(path)
    raise FtlError(f"{path}: neither a run directory (no {layout.RECIPE_FILE}) nor a model folder (no config.json)")


def format_to_score(kind: EvalKind, run: Recipe | None, stage: str, path: Path, data: str | None,
                    fmt: str | None) -> str:
    """The records' format: --format, else the run's, else a folder kind's only one; refused, naming the file
    and what fits, when the model's kind cannot score it (auto: checked once the rows are read)."""
    if run is None and not data:
        needs = "--data FILE" + ("" if len(kind.formats) == 1 else " and --format FORMAT")
        raise FtlError(f"{path} is {FOLDER_NAMES[stage]}: give {needs}")
    fmt = fmt or (run.data.format if run else kind.formats[0] if len(kind.formats) == 1 else None)
    if fmt is None:
        raise FtlError(f"{path} is {FOLDER_NAMES[stage]}: give --format FORMAT for --data {data}")
    if fmt != "auto":
        check_kinds(kind, run, stage, path, data, {FORMAT_KINDS[fmt]}, fmt)
    return fmt


def check_kinds(kind: EvalKind, run: Recipe | None, stage: str, path: Path, data: str | None, kinds: set[str],
                fmt: str) -> None:
    for record_kind in sorted(kinds - set(kind.formats)):
        what = f"{path} holds a {kind.name.replace('_', ' ')} (stage '{stage}')" if run else \
            f"{path} is {FOLDER_NAMES[stage]}"
        gives = f" ({record_kind} records)" if record_kind != fmt else ""
        where = f"--data {data}" if data else f"{path}'s data"
        raise FtlError(f"{where}: {what}; it scores {kind.describe} rows, not '{fmt}'{gives}")


def records_to_score(run: Recipe | None, path: Path, data: str | None, fmt: str, split: str):
    """(data section, records, where they come from, the kinds of record read): the whole file, or the run's
    split re-made from its data section (hash splits: the same rows every time), cut at eval.max_examples as
    the run's own evaluation was."""
    if data:
        data_cfg = data_config_for_file(data, fmt, run.data if run else None)
        splits, report = load_splits(data_cfg)
        return data_cfg, splits.train, data, report.kinds()
    splits, report = load_splits(run.data)
    records = getattr(splits, split)[: run.eval.max_examples]
    if not records:
        fraction = getattr(run.data.split, split, None)
        raise FtlError(f"{path}: the run's {split} split is empty (data.split.{split}: {fraction}); choose another "
                       "--split or give --data FILE")
    return run.data, records, f"{split} split", report.kinds()


def judged_by(run: Recipe, path: Path, kind: EvalKind, reward: str) -> Recipe:
    """The run's recipe with `reward:` replaced by the reward model at `reward` (a judge: another reward model,
    e.g. one trained on a share of the data the policy never saw). The run's missing-EOS penalty is kept, so
    the judge's win rate is measured as the run's own is."""
    if kind is not POLICY:
        raise FtlError(f"--reward {reward}: it rescores a policy's responses; {path} holds a "
                       f"{kind.name.replace('_', ' ')}")
    folder = Path(reward)
    if not (folder / "config.json").exists() or folder_stage(folder) != "reward":
        raise FtlError(f"--reward {reward}: expected a reward-model folder (a reward stage's final/ or merged/: "
                       "a one-output sequence classifier)")
    penalty = run.reward.missing_eos_penalty if run.reward else RewardSource.model_fields["missing_eos_penalty"].default
    return run.model_copy(update={"reward": RewardSource(kind="model", path=str(folder),
                                                         missing_eos_penalty=penalty)})


def on_prompts_of(run: Recipe, path: Path, kind: EvalKind, other: str) -> Recipe:
    """The run's recipe with another policy run's held-out prompts and sampling (its data section, eval size
    and sampling settings): policies trained on different data compared on the same prompts, drawn alike."""
    if kind is not POLICY:
        raise FtlError(f"--prompts-from {other}: it compares policies on the same prompts; {path} holds a "
                       f"{kind.name.replace('_', ' ')}")
    source, stage = open_target(Path(other))
    if source is None or BY_STAGE[stage] is not POLICY:
        raise FtlError(f"--prompts-from {other}: expected a policy's run directory (ppo, dpo or grpo), "
                       f"not {'a model folder' if source is None else f'a {stage} run'}")
    return run.model_copy(update={"data": source.data, "sampling": source.sampling,
                                  "eval": run.eval.model_copy(update={"max_examples": source.eval.max_examples})})


def evaluate_target(target: str, data: str | None = None, fmt: str | None = None, split: str = "validation",
                    out: str | None = None, max_new_tokens: int = 24, samples: int = 3, device: str = "auto",
                    reward: str | None = None, prompts_from: str | None = None) -> dict:
    check_format(fmt, data)  # every refusal comes before a model loads
    if prompts_from and data:
        raise FtlError("--prompts-from and --data both choose the prompts: give one")
    wanted = eval_device(device, torch.cuda.is_available())
    path = Path(target)
    run, stage = open_target(path)
    kind = BY_STAGE[stage]
    also = {}  # more rewards scoring the same responses: a judged run's own, next to the judge's
    if (reward or prompts_from) and run is None:
        flag = f"--reward {reward}" if reward else f"--prompts-from {prompts_from}"
        raise FtlError(f"{flag}: {path} is a model folder; give a policy's run directory (its recipe names the "
                       "model it started from)")
    if reward is not None:
        also = {"run_reward": run} if run.reward is not None else {}
        run = judged_by(run, path, kind, reward)
    if prompts_from is not None:
        run = on_prompts_of(run, path, kind, prompts_from)
    fmt = format_to_score(kind, run, stage, path, data, fmt)
    data_cfg, records, source, kinds = records_to_score(run, path, data, fmt, split)
    check_kinds(kind, run, stage, path, data, kinds, fmt)
    if len(kinds) == 1:  # the records' kind, what scoring reads (auto and alpaca/sharegpt name none)
        data_cfg = data_cfg.model_copy(update={"format": next(iter(kinds))})
    recipe = run.model_copy(update={"data": data_cfg}) if run else \
        Recipe.model_validate({"name": path.name, "stage": stage, "data": data_cfg.model_dump()})
    metrics = kind.evaluate(EvalJob(path, run is not None, recipe, records, source, wanted, max_new_tokens, samples,
                                    also))
    metrics.update(stage=stage, kind=kind.name, data=source, **({"judged_by": str(reward)} if reward else {}),
                   **({"prompts_from": str(prompts_from)} if prompts_from else {}))
    json_path, md_path = write_report(Path(out) if out else path / "eval", {"eval": metrics})
    print(metrics_line(f"{path} ({kind.name}, {len(records)} records from {source})", metrics))
    print(f"ftl: wrote {json_path} and {md_path}")
    return metrics
