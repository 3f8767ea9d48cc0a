"""The stall watchdog (train.stall_timeout_s): beats keep it quiet; silence writes the rank's stacks and ends
the process with exit code 124 and one `ftl: error:` line; a 2-rank launch with one rank stalled ends."""

import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import read_jsonl, run_ftl, subprocess_env, tiny_recipe_dict, write_recipe
from ftl.config import load_recipe
from ftl.errors import RecipeError
from ftl.train.watchdog import STALL_EXIT_CODE, TEST_STALL_ENV, Watchdog


def wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_beats_keep_it_quiet_and_silence_reports_the_stall(tmp_path):
    reports = []
    watchdog = Watchdog(0.3, tmp_path, rank=3, on_stall=reports.append)
    with watchdog.running(step=5):
        for step in range(6, 16):  # 10 beats 0.05 s apart: 0.5 s in all, more than the timeout
            time.sleep(0.05)
            watchdog.beat(step)
        assert reports == []
        started = time.monotonic()
        assert wait_for(lambda: reports, 3)  # the main thread "stalls" here
        assert 0.25 < time.monotonic() - started < 2.5
    stacks = tmp_path / "stall-rank3.txt"
    assert len(reports) == 1 and re.fullmatch(
        r"ftl: error: rank 3 made no progress for 0\.3 s while training \(last completed step 15; main thread in "
        r"wait_for at .*test_watchdog\.py:\d+\); stacks in " + re.escape(str(stacks))
        + r"; train\.stall_timeout_s sets the limit \(0: off\)", reports[0]), reports
    text = stacks.read_text()
    assert text.startswith("rank 3: no progress for 0.3 s while training (last completed step 15)")
    assert "in wait_for" in text and "in test_beats_keep_it_quiet_and_silence_reports_the_stall" in text
    assert "in _watch" in text  # every thread's stack, the watchdog's own included


def test_a_stall_inside_evaluation_says_so(tmp_path):
    reports = []
    watchdog = Watchdog(0.2, tmp_path, rank=0, on_stall=reports.append)
    evaluate = watchdog.watched(lambda model: wait_for(lambda: reports, 3) and {"loss": 1.0})
    with watchdog.running(step=4):
        assert evaluate("model") == {"loss": 1.0}
    assert "while evaluating (last completed step 4;" in reports[0]
    assert watchdog.activity == "training"  # the beat after the evaluation


def test_stopped_or_off_it_never_fires(tmp_path):
    reports = []
    stopped = Watchdog(0.2, tmp_path, rank=0, on_stall=reports.append)
    with stopped.running():
        pass
    off = Watchdog(0, tmp_path, rank=0, on_stall=reports.append).start()
    evaluate = lambda model: {}  # noqa: E731
    assert off.watched(evaluate) is evaluate and off._thread is None
    time.sleep(0.5)
    assert reports == [] and not list(tmp_path.iterdir())


def test_schema_default_and_negative_timeout(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run"))
    assert load_recipe(path).train.stall_timeout_s == 600
    assert load_recipe(path, overrides=["train.stall_timeout_s=0"]).train.stall_timeout_s == 0
    with pytest.raises(RecipeError, match=r"train\.stall_timeout_s"):
        load_recipe(path, overrides=["train.stall_timeout_s=-1"])


def test_a_stalled_process_exits_124_with_its_stacks(tmp_path):
    script = textwrap.dedent(f"""
        import time
        from ftl.train.watchdog import Watchdog
        Watchdog(0.5, {str(tmp_path)!r}, rank=2).start(step=7)
        print("buffered before the stall")  # stdout is a pipe: block-buffered until the watchdog flushes it
        def stuck_in_data_read():
            time.sleep(60)
        stuck_in_data_read()
    """)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONUNBUFFERED"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == STALL_EXIT_CODE, proc.stderr
    assert time.monotonic() - started < 30
    assert proc.stdout == "buffered before the stall\n"
    stacks = tmp_path / "stall-rank2.txt"
    assert re.fullmatch(r"\nftl: error: rank 2 made no progress for 0\.5 s while training \(last completed step 7; "
                        r"main thread in stuck_in_data_read at <string>:\d+\); stacks in "
                        + re.escape(str(stacks)) + r"; train\.stall_timeout_s sets the limit \(0: off\)\n",
                        proc.stderr), proc.stderr
    assert "in stuck_in_data_read" in stacks.read_text()


def rank_processes(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (the recipe path every rank is started with)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:  # exited while we looked
            pass
    return pids


def test_two_rank_launch_with_a_stalled_rank_ends_with_its_stacks(tmp_path):
    run_dir = tmp_path / "run"
    recipe = tiny_recipe_dict(run_dir, launch={"num_processes": 2},
                              train={"max_steps": 12, "batch_size": 2, "save_every": 6, "stall_timeout_s": 15})
    path = write_recipe(tmp_path / "stall.yaml", recipe)
    started = time.monotonic()
    proc = run_ftl("launch", str(path), cwd=tmp_path, timeout=400, **{TEST_STALL_ENV: "1:3"})
    elapsed = time.monotonic() - started
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert elapsed < 240, elapsed  # start-up + 15 s, not gloo's 30-minute collective timeout
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert re.search(r"ftl: error: rank 1 made no progress for 15 s while training \(last completed step 2; "
                     r"main thread in _stall_forever at .*watchdog\.py:\d+\); stacks in "
                     + re.escape(str(run_dir / "stall-rank1.txt")), proc.stderr), proc.stderr[-3000:]
    stacks = (run_dir / "stall-rank1.txt").read_text()
    assert "in _stall_forever" in stacks and "in fit" in stacks  # the sleeping frame, called from the loop
    assert rank_processes(str(path)) == [], "a rank outlived the launcher"
