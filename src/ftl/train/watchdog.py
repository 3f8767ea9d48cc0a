"""A per-rank stall watchdog: a rank that makes no progress for train.stall_timeout_s dumps its Python
stacks into the run folder and exits, instead of hanging the job until a collective times out (gloo's
default is 30 minutes) or forever (a stuck data read).

The training loops (fit, PPO) beat it at every micro-batch, optimizer step and evaluation. A daemon thread
waits for the next deadline; when it passes, the thread writes every thread's stack of this rank
(faulthandler) to `stall-rank<R>.txt`, prints one `ftl: error:` line naming the rank, its last completed
step and where its main thread is, and leaves with os._exit(STALL_EXIT_CODE): the main thread is stuck,
so nothing else could end the process. Every rank runs its own watchdog, so a rank waiting in a collective
for the stalled one times out too and dumps its own stacks (its main thread shows the collective; the
stalled rank's shows what it is stuck in). When one rank exits, the launcher's elastic agent (accelerate,
torchrun) stops the others: SIGTERM, then SIGKILL 30 s later, since ftl's SIGTERM handler only asks for a
checkpoint at the next step, which a stuck rank never reaches.

The watchdog runs only while the loop trains: `fit` and PPO stop it before the final evaluation and save,
which can take much longer than a step (the last step's checkpoint is already on disk by then).

Test hook: FTL_TEST_STALL_AT="RANK:STEP" makes rank RANK sleep forever before training step STEP
(in `_stall_forever`) while the watchdog is on, so a test can stall one rank of a real launch.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

from ftl.run_dir import STALL_STACKS_FILE

# The exit code of a rank the watchdog stops: the one coreutils `timeout` uses, so it reads as "timed out".
# accelerate/torchrun report it per rank in their failure summary and exit 1 themselves.
STALL_EXIT_CODE = 124

TEST_STALL_ENV = "FTL_TEST_STALL_AT"


class Watchdog:
    """Beat it whenever the rank makes progress; `timeout_s` without a beat ends the process (0: off)."""

    def __init__(self, timeout_s: float, run_dir: Path, rank: int,
                 on_stall: Optional[Callable[[str], None]] = None):
        self.timeout_s, self.run_dir, self.rank = timeout_s, Path(run_dir), rank
        self.on_stall = on_stall or exit_stalled  # tests pass a recorder instead of os._exit
        self.last_step = 0
        self.activity = "training"
        self._last_beat = time.monotonic()
        self._stopped = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stall_at = _test_stall_step(rank)

    @property
    def enabled(self) -> bool:
        return self.timeout_s > 0

    def start(self, step: int = 0) -> "Watchdog":
        if self.enabled:
            self.beat(step)
            self._thread = threading.Thread(target=self._watch, name=f"ftl-watchdog-rank{self.rank}", daemon=True)
            self._thread.start()
        return self

    @contextmanager
    def running(self, step: int = 0):
        """Watch from `step` (the last completed one) until the block ends, however it ends."""
        self.start(step)
        try:
            yield self
        finally:
            self.stop()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def beat(self, step: Optional[int] = None, activity: str = "training") -> None:
        """Progress: `step` is the last completed optimizer step (None: the same as before)."""
        self._last_beat = time.monotonic()
        self.activity = activity
        if step is not None:
            self.last_step = step
        if self._stall_at is not None and self.enabled and self.last_step + 1 == self._stall_at:
            _stall_forever()

    def beating(self, items):
        """Yield from `items`, beating after each one arrives (a stuck read stops the beats)."""
        for item in items:
            self.beat()
            yield item

    def watched(self, evaluate: Optional[Callable]) -> Optional[Callable]:
        """`evaluate` beating before and after each call, so an evaluation gets a whole timeout of its own."""
        if evaluate is None or not self.enabled:
            return evaluate

        def run(*args, **kwargs):
            self.beat(activity="evaluating")
            metrics = evaluate(*args, **kwargs)
            self.beat()
            return metrics
        return run

    def _watch(self) -> None:
        while True:
            remaining = self._last_beat + self.timeout_s - time.monotonic()
            if remaining <= 0:
                self.on_stall(self._report())
                return
            if self._stopped.wait(remaining):
                return

    def _report(self) -> str:
        """Write this rank's stacks and return the one-line error naming the rank, step and stuck frame."""
        path = self.run_dir / STALL_STACKS_FILE.format(rank=self.rank)
        header = (f"rank {self.rank}: no progress for {self.timeout_s:g} s while {self.activity} "
                  f"(last completed step {self.last_step}); stacks of all threads, most recent call first:\n\n")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                f.write(header)
                f.flush()  # faulthandler writes to the file descriptor, after what is buffered here
                faulthandler.dump_traceback(f, all_threads=True)
            where = f"stacks in {path}"
        except OSError as e:  # the process must still exit: dump to stderr instead
            faulthandler.dump_traceback(sys.__stderr__, all_threads=True)
            where = f"stacks on stderr above ({path}: {e.strerror or e})"
        return (f"ftl: error: rank {self.rank} made no progress for {self.timeout_s:g} s while {self.activity} "
                f"(last completed step {self.last_step}; main thread in {_main_thread_frame()}); {where}; "
                f"train.stall_timeout_s sets the limit (0: off)")


def exit_stalled(message: str) -> None:
    """Print `message` and end the process at once with STALL_EXIT_CODE (the main thread cannot be asked)."""
    # not sys.stderr: a stuck main thread may hold its lock; a newline first ends a progress bar's line
    os.write(2, ("\n" + message + "\n").encode())
    _flush_briefly()
    os._exit(STALL_EXIT_CODE)


def _flush_briefly() -> None:
    """Flush Python's stdout/stderr buffers, giving up after 2 s if a stuck main thread holds them."""
    def flush():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
    flusher = threading.Thread(target=flush, daemon=True)
    flusher.start()
    flusher.join(2)


def _main_thread_frame() -> str:
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "unknown"
    return f"{frame.f_code.co_name} at {frame.f_code.co_filename}:{frame.f_lineno}"


def _test_stall_step(rank: int) -> Optional[int]:
    wanted = os.environ.get(TEST_STALL_ENV, "")
    if not wanted:
        return None
    stall_rank, _, step = wanted.partition(":")
    return int(step) if int(stall_rank) == rank else None


def _stall_forever() -> None:
    while True:  # the test hook's stall: what a deadlocked collective or a stuck read looks like from here
        time.sleep(3600)
