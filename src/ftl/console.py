"""What a run's console shows: ftl's own story, without the third-party messages known to be harmless, and
all of it saved as RUN_DIR/run.log.

Noise is dropped by exact message, per logger (never warnings or logging switched off wholesale), so anything
new or unexpected from the same libraries still shows. `--verbose` (FTL_VERBOSE=1, inherited by the ranks a
launcher starts) shows everything.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

VERBOSE_ENV = "FTL_VERBOSE"


@dataclass(frozen=True)
class Noise:
    logger: str
    message: re.Pattern
    why: str


KNOWN_NOISE = (
    Noise("torchao", re.compile(r"Failed to load \S*torchao/_C\w*\.\S*\.so: "),
          "torchao's optional CUDA/cutlass kernels, which CPU wheels lack and ftl does not use"),
    Noise("torch.utils._pytree", re.compile(r"<enum '\w+'> is an Enum subclass and is now natively supported by "
                                            r"torch\.compile as an opaque value type\. Calling register_constant\(\)"),
          "torchao registering its enums the way torch now deprecates"),
    Noise("DeepSpeed", re.compile(r"Setting accelerator to CPU\. If you have GPU or other accelerator, we were unable "
                                  r"to detect it\.$"),
          "DeepSpeed on a CPU run: ftl chose the CPU (launch.device) and set it up itself"),
    Noise("bitsandbytes.backends.cpu.ops", re.compile(r"Failed to load CPU gemm_4bit_forward from kernels-community: "),
          "an optional CPU 4-bit kernel fetched from the hub; bitsandbytes uses its own"),
)


@dataclass(frozen=True)
class NoisyWarning:
    category: type
    message: str   # a regex matched at the start of the warning's text (warnings.filterwarnings)
    why: str


KNOWN_WARNINGS = (
    NoisyWarning(FutureWarning, r"`gradient_checkpointing_enable` is deprecated and will be removed in v6\. Use "
                                r"`activation_checkpointing_enable` instead\.",
                 "PEFT (prepare_model_for_kbit_training) calls transformers' old name; ftl uses the new one"),
    NoisyWarning(FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6\. Use "
                                r"`is_activation_checkpointing` instead\.",
                 "PEFT reads transformers' old attribute when wrapping the model"),
)


class DropKnownNoise(logging.Filter):
    def __init__(self, patterns: list[re.Pattern]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_known_noise(verbose_requested: bool = False) -> None:
    """Before the libraries are imported: filters on their loggers (a logger's filters see the records logged
    on it, whenever the logger is configured). `verbose_requested` reaches launched ranks via the environment."""
    if verbose_requested:
        os.environ[VERBOSE_ENV] = "1"
    if verbose():
        return
    by_logger: dict[str, list[re.Pattern]] = {}
    for noise in KNOWN_NOISE:
        by_logger.setdefault(noise.logger, []).append(noise.message)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(DropKnownNoise(patterns))
    for warning in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=warning.message, category=warning.category)


def hide_weight_bars() -> None:
    """transformers' per-file "Loading weights" / "Writing model shards" bars (not its logging, not hub
    downloads, not ftl's training bar)."""
    if not verbose():
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def metrics_line(label: str, metrics: dict) -> str:
    """One evaluation on one line: its numbers (samples and tables stay in eval.json / eval.md)."""
    numbers = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"ftl: eval {label}: {' | '.join(numbers) or 'no numeric metric'}"


def last_drawn(line: str) -> str:
    """A line redrawn in place with carriage returns (a progress bar), as it finally showed."""
    drawn = [part for part in line.split("\r") if part]
    return drawn[-1] if drawn else ""


class ConsoleLog:
    """sys.stdout and sys.stderr, also written to RUN_DIR/run.log once the run folder may be written (the new
    run validated). Lines before that are held (up to HELD_LIMIT characters). A progress bar's carriage-return
    redraws are kept as their last state, one line per bar."""

    HELD_LIMIT = 1 << 20

    def __init__(self):
        self.file: Optional[IO[str]] = None
        self.held: list[str] = []
        self.held_size = 0
        self.partial: dict[str, str] = {}  # per stream: a bar on stderr must not swallow a line on stdout
        self.enabled = True

    def write(self, text: str, stream: str = "stdout") -> None:
        if not self.enabled or not text:
            return
        lines = (self.partial.get(stream, "") + text).split("\n")
        partial = lines.pop()
        if "\r" in partial:  # a bar redrawing without a newline: hold only its latest state
            partial = last_drawn(partial) + ("\r" if partial.endswith("\r") else "")
        self.partial[stream] = partial
        for line in lines:
            self._line(last_drawn(line))

    def _line(self, line: str) -> None:
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()
        elif self.held_size < self.HELD_LIMIT:
            self.held.append(line)
            self.held_size += len(line)

    def save_to(self, path: Path, fresh: bool) -> None:
        """From now on (and everything held) into `path`: replaced on a fresh run, appended to on resume."""
        self.file = open(path, "w" if fresh else "a", encoding="utf-8", errors="replace")
        for line in self.held:
            self.file.write(line + "\n")
        self.file.flush()
        self.held, self.held_size = [], 0

    def discard(self) -> None:
        """Another rank's output: the main process's log is the run's."""
        self.enabled, self.held = False, []


class Tee:
    """A stream that also hands what it writes to the ConsoleLog; everything else is the stream's own."""

    def __init__(self, stream, log: ConsoleLog, name: str):
        self._stream, self._log, self._name = stream, log, name

    def write(self, text):
        self._log.write(text, self._name)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


_console_log: Optional[ConsoleLog] = None


def capture() -> ConsoleLog:
    """Start holding this process's console output (once), for save_to."""
    global _console_log
    if _console_log is None:
        _console_log = ConsoleLog()
        sys.stdout, sys.stderr = Tee(sys.stdout, _console_log, "stdout"), Tee(sys.stderr, _console_log, "stderr")
    return _console_log


def save_console(path: Path, main: bool, fresh: bool) -> None:
    """Called by the run once its folder may be written; a no-op where nothing was captured."""
    if _console_log is not None:
        if main:
            _console_log.save_to(path, fresh)
        else:
            _console_log.discard()
