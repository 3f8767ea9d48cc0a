"""manifest.json: what ran, on what, from which data — enough to reproduce or audit a run."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from ftl.track.secrets import redact, redact_argv

PACKAGES = ("ftl", "torch", "transformers", "accelerate", "deepspeed", "peft", "trl", "bitsandbytes",
            "datasets", "wandb", "tokenizers", "safetensors", "torchao")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit() -> dict:
    source = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=source, capture_output=True,
                               text=True, timeout=5).stdout.strip() != ""
        return {"commit": commit or None, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def write_manifest(path: Path, keep_attempts: bool = False, **fields) -> dict:
    """The manifest of this attempt. `attempts` lists every start of the run (time, command, resumed-from
    step); with keep_attempts (a resume) the earlier ones are kept rather than rewritten."""
    command, started = redact_argv(sys.argv), time.strftime("%Y-%m-%dT%H:%M:%S%z")
    earlier = []
    if keep_attempts and path.exists():
        try:
            earlier = json.loads(path.read_text()).get("attempts", [])
        except ValueError:  # a damaged manifest loses its history, not the run
            earlier = []
    manifest = {
        "command": command,
        "started": started,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": platform.node(),
        "packages": package_versions(),
        "git": git_commit(),
        **fields,
        "attempts": earlier + [{"started": started, "command": command,
                                "resumed_from_step": fields.get("resumed_from_step"), "host": platform.node()}],
    }
    path.write_text(redact(json.dumps(manifest, indent=1, ensure_ascii=False, default=str)))
    return manifest


def update_manifest(path: Path, **fields) -> None:
    manifest = json.loads(path.read_text())
    manifest.update(fields)
    path.write_text(redact(json.dumps(manifest, indent=1, ensure_ascii=False, default=str)))
