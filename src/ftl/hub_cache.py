"""Hugging Face hub ids, resolved through huggingface_hub's own cache: (`org/name`, revision, model or
dataset) → the snapshot folder huggingface_hub keeps under HF_HUB_CACHE (default HF_HOME/hub, default
~/.cache/huggingface/hub).

With network, missing files are fetched into that cache first, so a cluster node downloads once and the
same recipe then runs offline from it. Offline (HF_HUB_OFFLINE=1) only the cache is read, and a repo or
revision missing there is an error naming the id and the command that fetches it — at once: no request
is tried, so nothing waits on a network timeout.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ftl.errors import FtlError

DEFAULT_REVISION = "main"  # huggingface_hub.constants.DEFAULT_REVISION, without importing it here


@dataclass(frozen=True)
class Snapshot:
    repo_id: str
    revision: str  # as the recipe names it: a branch, a tag or a commit
    commit: str  # the commit it resolved to (the snapshot folder's name)
    path: Path

    def as_manifest(self) -> dict:
        return {"name": self.repo_id, "revision": self.revision, "commit": self.commit, "path": str(self.path)}


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE


def hub_snapshot(repo_id: str, revision: Optional[str], repo_type: str, key: str, error: type[FtlError] = FtlError,
                 allow_patterns: Optional[tuple[str, ...]] = None,
                 ignore_patterns: Optional[tuple[str, ...]] = None) -> Snapshot:
    """The local snapshot of `repo_id` at `revision` (a branch, tag or commit; default main). `key` is the
    recipe key named in errors; `allow_patterns`/`ignore_patterns` limit what is fetched with network."""
    return _resolve(repo_id, revision or DEFAULT_REVISION, repo_type, key, error, allow_patterns, ignore_patterns,
                    str(hub_cache_dir()), hub_offline())


@functools.lru_cache(maxsize=None)  # one commit per process: a branch that moves mid-run does not mix files
def _resolve(repo_id, revision, repo_type, key, error, allow_patterns, ignore_patterns, cache, offline) -> Snapshot:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache,
                                   local_files_only=offline, allow_patterns=list(allow_patterns or []) or None,
                                   ignore_patterns=list(ignore_patterns or []) or None)
    except IncompleteSnapshotError as err:  # an interrupted download: some files are missing
        raise error(f"{key}: {repo_id!r} (revision {revision}) is only partly in the Hugging Face cache at {cache} "
                    f"({str(err).split('. ')[0]}): complete it with "
                    f"`{download_command(repo_id, revision, repo_type)}`") from None
    except LocalEntryNotFoundError as err:
        raise error(not_cached(repo_id, revision, repo_type, key, Path(cache), offline, err)) from None
    except HfHubHTTPError as err:  # online: no such repo or revision, gated, or the hub failed
        reason = str(err).strip().splitlines()[0]
        raise error(f"{key}: {repo_id!r} (revision {revision}) could not be fetched from the Hugging Face hub: "
                    f"{reason}") from None
    folder = Path(folder)
    return Snapshot(repo_id, revision, folder.name, folder)


def download_command(repo_id: str, revision: str, repo_type: str) -> str:
    return " ".join(["hf download", repo_id] + ([f"--repo-type {repo_type}"] if repo_type != "model" else [])
                    + ([f"--revision {revision}"] if revision != DEFAULT_REVISION else []))


def not_cached(repo_id: str, revision: str, repo_type: str, key: str, cache: Path, offline: bool, err) -> str:
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file()) \
        if (repo / "refs").is_dir() else []
    held = f" (the cache holds its revisions: {', '.join(refs)})" if refs else ""
    if offline:
        why = "and HF_HUB_OFFLINE=1"
    else:  # huggingface_hub chains the connection error that made it fall back to the cache
        cause = err.__cause__ or err
        why = f"and the hub could not be reached ({type(cause).__name__}: {(str(cause).splitlines() or [''])[0]})"
    return (f"{key}: {repo_id!r} (revision {revision}) is not in the Hugging Face cache at {cache}{held} {why}: "
            f"fetch it on a machine with network with `{download_command(repo_id, revision, repo_type)}` "
            "(older huggingface_hub: `huggingface-cli download`), then point HF_HOME or HF_HUB_CACHE at that cache")
