"""train.host_allocator: `reuse` keeps freed host blocks for the next allocation (no page faults on reuse),
`system` leaves glibc's defaults, and a platform without glibc refuses `reuse` by name.

Each mode runs in a fresh process: glibc's settings are per process and the test process's may be changed."""

import json
import subprocess
import sys

import pytest

from conftest import subprocess_env
from ftl.errors import RecipeError
from ftl.train import host_allocator

# page faults while allocating, touching and freeing a 64 MB tensor 5 times, after 12 warm-up cycles (glibc's
# aligned allocations, torch's, need a few to settle: a freed aligned block alone cannot serve the next request)
PROBE = """
import json, resource, sys, torch
from ftl.train.host_allocator import apply_host_allocator
record = apply_host_allocator(sys.argv[1])
def cycle():
    t = torch.ones(16 * 2**20)  # 64 MB: above glibc's mmap threshold (at most 32 MB)
    del t
for _ in range(12):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    cycle()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, "record": record}))
"""


def probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(host_allocator.glibc() is None, reason="glibc only")
def test_reuse_serves_a_freed_block_again_without_page_faults():
    system, reuse, auto = probe("system"), probe("reuse"), probe("auto")
    pages = 5 * 64 * 2**20 // 4096
    assert system["faults"] > pages // 2  # fresh memory from the OS each time (4 KiB pages, or fewer if huge)
    assert reuse["faults"] < pages // 50, (reuse, system)
    assert auto["faults"] < pages // 50
    assert reuse["record"]["mode"] == auto["record"]["mode"] == "reuse"
    assert reuse["record"]["mallopt"] == {"M_MMAP_MAX": 0, "M_TRIM_THRESHOLD": 2**31 - 1}
    assert system["record"] == {"requested": "system", "mode": "system", "glibc": reuse["record"]["glibc"]}


def test_without_glibc_reuse_is_refused_and_auto_keeps_the_system_allocator(monkeypatch):
    monkeypatch.setattr(host_allocator, "glibc", lambda: None)
    with pytest.raises(RecipeError, match=r"train.host_allocator: reuse needs glibc"):
        host_allocator.apply_host_allocator("reuse")
    assert host_allocator.apply_host_allocator("auto")["mode"] == "system"
