"""W&B when the recipe asks: online with an API key, offline (files in the run directory) without."""

from __future__ import annotations

import netrc
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from ftl.config.schema import WandbConfig
from ftl.config.secret_keys import redact_tree
from ftl.track.secrets import redact_argv


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def choose_mode(cfg: WandbConfig) -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_api_key() else "offline"


@contextmanager
def redacted_command_line():
    """W&B records sys.argv (its metadata and debug log) when a run starts: show it the redacted one."""
    argv = sys.argv
    sys.argv = redact_argv(argv)
    try:
        yield
    finally:
        sys.argv = argv


def dashboard_names(record: dict) -> dict:
    """A metrics.jsonl record as W&B panels group it, the way Trainer and TRL runs look: training scalars
    under train/ (`loss` -> `train/loss`, `lr` -> `train/lr`), names that carry a section (`eval/loss`) as
    they are."""
    return {k if "/" in k else f"train/{k}": v for k, v in record.items() if k != "step"}


class WandbSink:
    """Callable sink for MetricsLog; the key is read by wandb from the environment, never stored. The
    recipe's secrets reach neither W&B's config nor its logs: `config` is redacted here."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, name: str, config: dict, stage: str):
        import wandb

        self.mode = choose_mode(cfg)
        os.environ.setdefault("WANDB_SILENT", "true")
        with redacted_command_line():
            self.run = wandb.init(project=cfg.project, entity=cfg.entity, name=name, dir=str(run_dir),
                                  mode=self.mode, config=redact_tree(config), tags=cfg.tags, group=cfg.group,
                                  job_type=cfg.job_type or stage, reinit="finish_previous")
        where = self.run.dir if self.mode != "disabled" else "(disabled)"
        print(f"ftl: W&B {self.mode} run; files in {where}", flush=True)

    def __call__(self, record: dict) -> None:
        self.run.log(dashboard_names(record), step=record["step"])

    def finish(self) -> None:
        self.run.finish()
