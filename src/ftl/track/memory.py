"""Peak memory of a run, measured in its own process(es), for the manifest and `ftl compare`.

On CPU a rank's "device" memory is its resident set: the high-water mark is the kernel's `VmHWM` for this
process's address space (/proc/self/status), and the current resident size is read from /proc/self/statm.
Not `getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries that across exec, so a run started by a large
process (a Python that had imported torch, forking or vfork-ing the launcher) starts with its parent's
high-water mark (measured: 0.45-1.0 GB in runs whose own peak before loading a model was 0.43 GB). Where
/proc is missing (macOS) it is ru_maxrss (bytes there). On GPU it is `torch.cuda.max_memory_allocated()`: tensors only, not
the CUDA context or the caching allocator's reserve. Marks taken along the run (after the runtime is
imported, after the data, after the model loads, after training) keep the current figure and the peak so
far, so the runtime baseline and the model's weights can be told apart from what training adds.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import resource
import sys
from typing import Optional

HOST_RSS = "host RSS high-water (VmHWM)"
CUDA_ALLOCATED = "torch.cuda.max_memory_allocated"


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark, in bytes (since its exec: not its parent's)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def rss_bytes() -> int:
    """This process's resident set now, in bytes (the high-water mark where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def release_freed_memory() -> None:
    """Hand the C allocator's free blocks back to the OS (glibc `malloc_trim`), at a phase boundary (before and
    after an evaluation). glibc keeps what a phase freed resident (training's activations, allocated below its
    mmap threshold), and the next phase's large buffers (evaluation's logits, mmapped) land on top of it: a
    CPU run's peak would be training's plus evaluation's instead of the larger of the two (measured on SmolLM2
    LoRA: 3.2 GB vs 2.3 GB). 0.04-0.07 s once the imports are frozen (freeze_live_objects_once); nothing
    on other platforms."""
    gc.collect()
    libc = glibc()
    if libc is not None:  # not glibc (musl, macOS): nothing to trim
        libc.malloc_trim(0)


@functools.lru_cache(maxsize=None)
def glibc():
    """glibc's handle (ctypes), or None where the C library is another (musl, macOS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p  # glibc only: AttributeError elsewhere
    except (OSError, AttributeError):
        return None
    return libc


_objects_frozen = False


def freeze_live_objects_once() -> None:
    """Collect, then move every object still alive into the collector's permanent generation, once per process:
    call it before the process's first model is built. By then the libraries are imported (~440k objects with
    torch, transformers, accelerate and deepspeed), and neither release_freed_memory's full collections nor
    the automatic ones need to scan them again (each scan took 0.2-0.3 s here, six per tiny run). Frozen objects
    are still freed by reference counting; only a cycle among them would never be, which is why no model may be
    alive yet (a dropped transformers model leaves ~80 objects in cycles)."""
    global _objects_frozen
    if not _objects_frozen:
        gc.collect()
        gc.freeze()
        _objects_frozen = True


def _cuda(device) -> bool:
    return getattr(device, "type", device) == "cuda"


class MemoryProbe:
    """Marks along one rank's run: {name: {"now": bytes, "peak": bytes so far}}."""

    def __init__(self, device="cpu"):
        self.device = device
        self.marks: dict[str, dict[str, int]] = {}

    @property
    def measure(self) -> str:
        return CUDA_ALLOCATED if _cuda(self.device) else HOST_RSS

    def now(self) -> int:
        if _cuda(self.device):
            import torch

            return int(torch.cuda.memory_allocated(self.device))
        return rss_bytes()

    def peak(self) -> int:
        if _cuda(self.device):
            import torch

            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    def mark(self, name: str) -> dict[str, int]:
        self.marks[name] = {"now": self.now(), "peak": self.peak()}
        return self.marks[name]

    def rank_record(self) -> dict:
        """This rank's figures (its peak measured now)."""
        return {"peak_bytes": self.peak(), "marks": dict(self.marks)}


def summarise(per_rank: list[dict], measure: str, planned: Optional[dict] = None) -> dict:
    """The manifest's `memory`: the peak as the max over ranks, every rank's own figures, and the baseline
    (what the runtime and data hold before the model loads) of the rank that peaked."""
    worst = max(range(len(per_rank)), key=lambda r: per_rank[r]["peak_bytes"])
    marks = per_rank[worst]["marks"]
    out = {"measure": measure, "peak_bytes": per_rank[worst]["peak_bytes"], "peak_rank": worst,
           "baseline_bytes": (marks.get("data") or marks.get("start") or {}).get("now"),
           "model_loaded_bytes": (marks.get("model") or {}).get("now"),
           "per_rank": per_rank}
    if planned is not None:
        out["planned"] = planned
        if planned.get("peak_bytes"):
            out["planned_error"] = round(planned["peak_bytes"] / out["peak_bytes"] - 1, 4)
    return out

