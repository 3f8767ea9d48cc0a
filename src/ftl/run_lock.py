"""One run per run directory: a lock file held for the run's life.

The main process creates `<run_dir>/.ftl.lock` atomically (O_EXCL) with its pid, host, start time,
command and Slurm job; the other ranks of the same run learn the outcome from it (the session
broadcasts it), so ranks share the lock. It is released on any normal exit or exception (the runner's
`finally`, and atexit). A lock left by a killed process is stale and taken over when its holder is
provably gone: same host and the pid no longer runs, or the same Slurm job (a requeued job restarting),
or no heartbeat (the holder touches the file every HEARTBEAT_S) for STALE_AFTER_S from another host.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from ftl.errors import FtlError
from ftl.run_dir import LOCK_FILE

HEARTBEAT_S = 60
STALE_AFTER_S = 300  # several missed heartbeats: the holder on another host is gone


class RunLocked(FtlError):
    """Another live run holds this run directory."""


def holder_description(info: dict) -> str:
    return (f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}"
            + (f", Slurm job {info['slurm_job']}" if info.get("slurm_job") else ""))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def stale_reason(info: dict, lock_age_s: float) -> Optional[str]:
    """Why a held lock can be taken over, or None while its holder may be alive."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and info.get("slurm_job") == job:
        return f"left by this Slurm job's previous start ({holder_description(info)})"
    if info.get("host") == socket.gethostname():
        pid = info.get("pid")
        if not isinstance(pid, int) or not _pid_alive(pid):
            return f"its holder is gone ({holder_description(info)})"
        return None
    if lock_age_s > STALE_AFTER_S:
        return f"no heartbeat for {lock_age_s:.0f} s ({holder_description(info)})"
    return None


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self._stop = threading.Event()

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over. Raises RunLocked if held."""
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info, age = self._read()
                reason = stale_reason(info, age)
                if reason is None:
                    raise RunLocked(f"{self.path.parent}: another run is using this folder ({holder_description(info)}); "
                                    f"wait for it, stop it, or choose another track.output_dir (if no such run is "
                                    f"alive, delete {self.path})") from None
                note = f"ftl: took over a stale lock on {self.path.parent}: {reason}"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv[:3],
                           "slurm_job": os.environ.get("SLURM_JOB_ID")}, f)
            self.held = True
            _HELD.append(self)
            threading.Thread(target=self._heartbeat, daemon=True, name="ftl-lock-heartbeat").start()
            return note
        raise RunLocked(f"{self.path.parent}: could not take the lock {self.path}")

    def _read(self) -> tuple[dict, float]:
        try:
            info = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):  # half-written or vanished: treat as a dead holder's
            return {}, float("inf")
        return (info if isinstance(info, dict) else {}), age

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        info, _ = self._read()
        if info.get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False
        if self in _HELD:
            _HELD.remove(self)


_HELD: list[RunLock] = []


def release_all() -> None:
    """Release every lock this process holds (the runner's finally; atexit for anything else)."""
    for lock in list(_HELD):
        lock.release()


atexit.register(release_all)
