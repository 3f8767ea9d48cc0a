"""How the process's C allocator treats freed host memory (`train.host_allocator`).

glibc hands every block above its mmap threshold (at most 32 MB, dynamic) straight back to the OS when it is
freed, so a tensor of that size allocated again next step is fresh memory the kernel must fault in page by page:
the per-forward bf16 copies of the weights under autocast, their gradients cast back to fp32, an embedding's
dense gradient (SmolLM2: 49152 x 576 fp32 = 113 MB, zero-filled every backward), the optimizer's temporaries.
Measured on SmolLM2-135M PPO (full policy, 2 threads): 32% of a bf16 step in `copy_` and 12% in `fill_`, most of
it page faults; `reuse` took the step from 9.4 s to 5.6 s (bf16) and 13.3 s to 10.6 s (fp32), peak RSS +2%
(bench/ppo_vs_trl.py: 1.27x the episodes/s with a full policy, 1.1-1.2x with LoRA).

reuse: every block comes from the heap and freed ones stay there for the next allocation (mallopt M_MMAP_MAX 0)
and the heap's top is not trimmed after each free (M_TRIM_THRESHOLD at its maximum). Memory goes back to the
OS only at phase boundaries (ftl.track.memory.release_freed_memory's malloc_trim), so training and evaluation
still do not stack. Costs 2-5% peak RSS on the SFT memory bench: torch allocates with posix_memalign, and a freed
aligned block alone cannot serve the next aligned request of its size (glibc asks for the size plus the
alignment), so the heap holds a few such blocks before freed neighbours coalesce and steps stop faulting.
system: glibc's defaults. auto: reuse where glibc is the allocator (Linux), else system.
"""

from __future__ import annotations

import sys

from ftl.errors import RecipeError
from ftl.track.memory import glibc

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's malloc.h
REUSE = {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}  # mallopt takes an int: the largest trim threshold
# glibc's documented defaults, for a process that switches back (tests run several recipes in one process);
# setting them explicitly keeps the mmap threshold fixed at 128 KiB instead of glibc's dynamic one
SYSTEM = {"M_MMAP_MAX": 65536, "M_TRIM_THRESHOLD": 128 * 1024, "M_MMAP_THRESHOLD": 128 * 1024}
PARAMETERS = {"M_TRIM_THRESHOLD": M_TRIM_THRESHOLD, "M_MMAP_THRESHOLD": M_MMAP_THRESHOLD, "M_MMAP_MAX": M_MMAP_MAX}

_applied: str | None = None  # what this process last set ("reuse" / "system"), None: glibc untouched


def apply_host_allocator(requested: str) -> dict:
    """Sets the allocator as `train.host_allocator` says and returns the manifest's record of what ran."""
    global _applied
    libc = glibc()
    if libc is None:
        if requested == "reuse":
            raise RecipeError(f"train.host_allocator: reuse needs glibc's mallopt (Linux); this is {sys.platform} "
                              "with another C library. Expected auto or system.")
        return {"requested": requested, "mode": "system", "reason": "not glibc: its allocator's own defaults"}
    mode = "reuse" if requested in ("auto", "reuse") else "system"
    settings = REUSE if mode == "reuse" else (SYSTEM if _applied == "reuse" else {})
    for name, value in settings.items():
        if libc.mallopt(PARAMETERS[name], value) != 1:
            raise RecipeError(f"train.host_allocator: {mode}: glibc refused mallopt({name}, {value}). "
                              "Expected system here.")
    record = {"requested": requested, "mode": mode, "glibc": libc.gnu_get_libc_version().decode()}
    if settings:
        _applied = mode
        record["mallopt"] = dict(settings)
    return record
