"""The console tells ftl's story: known third-party noise is dropped by exact message (and shown with
--verbose), the run prints its folder, one data line and one line per evaluation, the bar shows loss, lr and
tokens/s, and everything the main process printed is saved as RUN_DIR/run.log (appended to on --resume)."""

import subprocess
import sys

import pytest

from conftest import RECIPES, run_ftl, subprocess_env
from ftl.console import KNOWN_NOISE, KNOWN_WARNINGS, ConsoleLog

NOISE_MARKERS = ("Failed to load", "is an Enum subclass", "Setting accelerator to CPU", "is deprecated and will be")

EMIT = """
import logging, sys, warnings
from ftl.console import quiet_known_noise
quiet_known_noise(verbose_requested=len(sys.argv) > 1)
logging.basicConfig(format="%(name)s|%(message)s", stream=sys.stdout)
for name, message in [
    ("torchao", "Failed to load /x/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library"),
    ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
                            "torch.compile as an opaque value type. Calling register_constant() on Enum subclasses"),
    ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: No module"),
    ("torchao", "Failed to quantize: a new problem"),                  # same logger, another message: shown
    ("DeepSpeed", "Setting accelerator to CPU. Something else too."),  # not the exact message: shown
]:
    logging.getLogger(name).warning(message)
warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6. Use "
              "`activation_checkpointing_enable` instead.", FutureWarning)
warnings.warn("`gradient_checkpointing_enable` is deprecated, another text", FutureWarning)
"""


def emitted(verbose: bool) -> str:
    argv = [sys.executable, "-c", EMIT] + (["verbose"] if verbose else [])
    env = {k: v for k, v in subprocess_env().items() if k != "FTL_VERBOSE"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_known_noise_is_dropped_by_exact_message_and_shown_with_verbose():
    quiet, loud = emitted(verbose=False), emitted(verbose=True)
    assert "_C_mxfp8" not in quiet and "KernelPreference" not in quiet and "we were unable" not in quiet
    assert "gemm_4bit_forward" not in quiet and "activation_checkpointing_enable` instead" not in quiet
    assert "a new problem" in quiet and "Something else too" in quiet and "another text" in quiet
    for marker in ("_C_mxfp8", "KernelPreference", "we were unable", "gemm_4bit_forward", "a new problem",
                   "activation_checkpointing_enable` instead"):
        assert marker in loud, marker
    assert len(KNOWN_NOISE) == 4 and len(KNOWN_WARNINGS) == 2 and all(n.why for n in KNOWN_NOISE + KNOWN_WARNINGS)


def test_console_log_keeps_a_redrawn_bar_as_its_last_state_and_holds_lines_until_saved(tmp_path):
    log = ConsoleLog()
    log.write("ftl: run folder X\n")
    log.write("train:  0%|  | 0/2\rtrain: 50%|# | 1/2")
    log.write("\rtrain: 100%|##| 2/2\n")
    log.write("ftl: eval after training: loss 1.5\n")
    path = tmp_path / "run.log"
    assert not path.exists()  # held until the run's folder may be written
    log.save_to(path, fresh=True)
    log.write("ftl: report R\n")
    assert path.read_text() == ("ftl: run folder X\ntrain: 100%|##| 2/2\nftl: eval after training: loss 1.5\n"
                                "ftl: report R\n")
    again = ConsoleLog()
    again.write("second\n")
    again.save_to(path, fresh=False)  # --resume appends
    assert path.read_text().endswith("ftl: report R\nsecond\n")


def test_plan_hides_known_noise_unless_verbose(tmp_path):
    recipe = str(RECIPES / "sft_chat.yaml")
    quiet = run_ftl("plan", recipe, "--profile", "tiny", cwd=tmp_path)
    loud = run_ftl("plan", recipe, "--profile", "tiny", "--verbose", cwd=tmp_path)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert not any(m in quiet.stdout + quiet.stderr for m in NOISE_MARKERS), quiet.stderr
    assert "torchao/_C" in loud.stderr  # torchao's CPU wheel lacks its CUDA kernels on this machine


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory):
    """A tiny run of 8 steps, then --resume to 12: the console of each and the run folder."""
    tmp = tmp_path_factory.mktemp("console")
    overrides = [f"track.output_dir={tmp / 'run'}", "train.save_every=4", "eval.every=4", "data.limit=300"]
    first = run_ftl("run", str(RECIPES / "sft_chat.yaml"), "--profile", "tiny", "train.max_steps=8", *overrides,
                    cwd=tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_ftl("run", str(RECIPES / "sft_chat.yaml"), "--profile", "tiny", "train.max_steps=12", "--resume",
                     *overrides, cwd=tmp)
    assert second.returncode == 0, second.stderr[-3000:]
    return first, second, tmp / "run"


def test_run_console_tells_the_story_in_a_few_lines(logged_runs):
    first, _, run = logged_runs
    out = first.stdout
    assert f"ftl: run folder {run} (sft_chat, profile tiny, 1 process on cpu)" in out
    (data,) = [line for line in out.splitlines() if line.startswith("ftl: data: ")]
    assert " train / " in data and "packed rows (max_length" in data and "duplicates dropped" in data
    assert "bad rows skipped" in data and "truncated" in data
    evals = [line for line in out.splitlines() if line.startswith("ftl: eval ")]
    assert [e.split(":")[1] for e in evals] == [" eval before training", " eval step 4", " eval after training"]
    assert all("loss " in e and "perplexity " in e for e in evals)
    assert "lr=" in first.stderr and "tok/s=" in first.stderr and "loss=" in first.stderr
    assert not any(m in out + first.stderr for m in NOISE_MARKERS)
    assert "Loading weights" not in first.stderr and "| metric |" not in out  # the report stays in eval.md


def test_run_log_holds_the_console_once_per_line_and_resume_appends(logged_runs):
    first, second, run = logged_runs
    log = (run / "run.log").read_text()
    assert "\r" not in log
    assert log.count("ftl: run folder") == 2 and "1 process on cpu, resuming)" in log
    for line in first.stdout.splitlines() + second.stdout.splitlines():
        assert line in log, line
    bars = [line for line in log.splitlines() if line.startswith("train:")]
    assert len(bars) == 2 and all("100%" in b for b in bars)  # each bar once, as it ended
