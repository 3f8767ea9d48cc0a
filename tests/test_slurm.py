"""Slurm against a real controller: munged + slurmctld + two slurmd ("nodes" n1, n2) started in a temp
folder. Submission, a 2-node gloo job, a pipeline as afterok-chained jobs, preemption with requeue and
resume, and a failed stage cancelling its dependants."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, copy_rlhf_pipeline, run_ftl, train_losses
from slurm_cluster import SlurmCluster, SlurmUnavailable

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def slurm():
    root = Path(tempfile.mkdtemp(prefix="ftl-slurm-"))  # not under pytest's 0700 tmp: munged must enter it
    try:
        cluster = SlurmCluster(root).start()
    except SlurmUnavailable as err:
        if os.environ.get("FTL_REQUIRE_SLURM"):  # CI: a missing Slurm is a failure, never a skip
            pytest.fail(f"Slurm required (FTL_REQUIRE_SLURM) but unavailable: {err}")
        pytest.skip(f"Slurm tests need Slurm: {err}")
    yield cluster
    cluster.stop()


def ftl(slurm, *args, cwd, timeout=120):
    return run_ftl(*args, cwd=cwd, timeout=timeout, SLURM_CONF=str(slurm.conf))


def scontrol(slurm, *args) -> str:
    return subprocess.run(["scontrol", *args], env=slurm.env, capture_output=True, text=True).stdout


def job(slurm, job_id) -> dict:
    return dict(field.split("=", 1) for field in scontrol(slurm, "show", "job", "-o", job_id).split()
                if "=" in field)


def wait_for(slurm, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=300) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(slurm, job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job(slurm, job_id)}")


def submitted_id(proc) -> str:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout.split("submitted job ")[1].split(";")[0]


def job_log(run_dir: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((run_dir / "slurm").glob("*.out")))


def test_submitted_recipe_completes_with_checkpoint_and_metrics(slurm, tiny_recipe, tmp_path):
    recipe = tiny_recipe()
    dry = ftl(slurm, "slurm", "submit", str(recipe), "--gpus-per-node", "1", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "#SBATCH --gpus-per-node=1" in dry.stdout and "#SBATCH --requeue" in dry.stdout
    assert "#SBATCH --signal=USR1@300" in dry.stdout and not (tmp_path / "run" / "slurm").exists()
    # GPU-shaped request on the fake GPUs: the script runs unchanged, the tiny profile trains on CPU
    job_id = submitted_id(ftl(slurm, "slurm", "submit", str(recipe), "--gpus-per-node", "1", cwd=tmp_path))
    info = wait_for(slurm, job_id)
    run = tmp_path / "run"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_log(run)
    assert (run / "checkpoints" / "step-0000016").is_dir() and (run / "final").is_dir()
    assert len(train_losses(run)) == 16 and json.loads((run / "manifest.json").read_text())["finished"]
    status = ftl(slurm, "slurm", "status", job_id, cwd=tmp_path)
    assert status.returncode == 0 and "COMPLETED" in status.stdout


def test_template_in_slurm_folder_runs_as_is_with_sbatch(slurm, tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 4, "save_every": 4})
    # the template's own #SBATCH defaults ask for 8 GPUs and 64 cores: overridden on the command line
    proc = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=1", "--cpus-per-task=1", "--time=30",
                           f"--output={tmp_path}/job-%j.out", str(ROOT / "slurm" / "train_node.sbatch"),
                           str(recipe), ""], env={**slurm.env, "FTL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"},
                          cwd=tmp_path, capture_output=True, text=True, check=True)
    info = wait_for(slurm, proc.stdout.strip())
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert info["JobState"] == "COMPLETED", log
    assert (tmp_path / "run" / "final").is_dir() and len(train_losses(tmp_path / "run")) == 4


def test_two_node_job_trains_over_gloo_in_sync(slurm, tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 8, "save_every": 8})
    job_id = submitted_id(ftl(slurm, "slurm", "submit", str(recipe), "--nodes", "2", cwd=tmp_path))
    run = tmp_path / "run"
    info = wait_for(slurm, job_id)
    assert info["JobState"] == "COMPLETED" and info["NodeList"] == "n[1-2]", job_log(run)
    log = job_log(run)
    assert "--machine_rank 0" in log and "--machine_rank 1" in log and "--rdzv_backend c10d" in log
    checks = json.loads((run / "manifest.json").read_text())["rank_checks"]
    assert [c["world_size"] for c in checks] == [2, 2]
    assert sorted(c["slurm_node"] for c in checks) == [0, 1]            # one rank on each "node"
    assert checks[0]["param_digest"] == checks[1]["param_digest"]        # gradients were all-reduced


def test_preempted_job_requeues_and_resumes_to_the_same_final_loss(slurm, tiny_recipe, tmp_path):
    steps = {"max_steps": 400, "save_every": None, "batch_size": 8}
    reference = tiny_recipe("reference.yaml", run_dir=tmp_path / "reference", train=steps)
    assert run_ftl("launch", str(reference), cwd=tmp_path, timeout=300).returncode == 0
    recipe = tiny_recipe(train=steps)
    run = tmp_path / "run"
    job_id = submitted_id(ftl(slurm, "slurm", "submit", str(recipe), cwd=tmp_path))
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and len(train_losses(run)) >= 20):
        assert time.time() < deadline and job(slurm, job_id)["JobState"] in ("PENDING", "RUNNING"), job_log(run)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm.env, check=True)  # as a preemption would
    deadline = time.time() + 120
    while not (job(slurm, job_id).get("Restarts") == "1" and job(slurm, job_id)["JobState"] == "PENDING"):
        assert time.time() < deadline, (job(slurm, job_id), job_log(run))
        time.sleep(0.5)
    interrupted_at = max(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert 20 <= interrupted_at < 400
    # A requeued job waits cred_expire (120 s by default; 10 s on the test cluster) before it may start:
    # started sooner, the node still holds the old run's revoked credential and the job fails.
    info = wait_for(slurm, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", job_log(run)
    log = job_log(run)
    assert "SIGUSR1 received" in log and "requeueing job" in log and "restart 1" in log
    assert json.loads((run / "manifest.json").read_text())["resumed_from_step"] == interrupted_at
    assert train_losses(run) == train_losses(tmp_path / "reference")    # identical curve, identical end


def test_pipeline_script_chains_recipes_as_afterok_jobs(slurm, tiny_recipe, tmp_path):
    first = tiny_recipe("first.yaml", run_dir=tmp_path / "first", train={"max_steps": 4, "save_every": 4})
    second = tiny_recipe("second.yaml", run_dir=tmp_path / "second", train={"max_steps": 4, "save_every": 4})
    options = f"--gpus-per-node=1 --cpus-per-task=1 --time=30 --output={tmp_path}/job-%j.out"
    proc = subprocess.run(["bash", str(ROOT / "slurm" / "pipeline.sh"), "", str(first), str(second)],
                          env={**slurm.env, "FTL_SBATCH_ARGS": options, "FTL_PYTHON": sys.executable,
                               "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first_id, second_id = (line.split(": job ")[1].split()[0] for line in proc.stdout.splitlines())
    assert f"(after afterok:{first_id})" in proc.stdout
    infos = [wait_for(slurm, job_id) for job_id in (first_id, second_id)]
    log = "".join(p.read_text() for p in tmp_path.glob("job-*.out"))
    assert [i["JobState"] for i in infos] == ["COMPLETED", "COMPLETED"], log
    assert infos[1]["StartTime"] >= infos[0]["EndTime"]                  # ISO timestamps: the second waited
    assert all(len(train_losses(tmp_path / run)) == 4 for run in ("first", "second"))


def stage_jobs(out: Path) -> dict:
    return json.loads((out / "slurm_jobs.json").read_text())


def test_pipeline_stages_run_as_chained_jobs(slurm, tmp_path):
    path = copy_rlhf_pipeline(tmp_path, ("sft", "reward", "ppo"), ppo=["train.max_steps=4"])
    proc = ftl(slurm, "pipeline", str(path), "--profile", "tiny", "--slurm", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    jobs = stage_jobs(out)
    assert list(jobs) == ["sft", "reward", "ppo"]
    reward = job(slurm, jobs["reward"]["job_id"])
    assert reward["Dependency"] in (f"afterok:{jobs['sft']['job_id']}(unfulfilled)", "(null)")
    infos = {name: wait_for(slurm, j["job_id"], timeout=600) for name, j in jobs.items()}
    assert all(i["JobState"] == "COMPLETED" for i in infos.values()), \
        {n: (i["JobState"], Path(jobs[n]["log"]).read_text()[-1500:]) for n, i in infos.items()}
    ppo_recipe = yaml.safe_load((out / "ppo" / "recipe.yaml").read_text())
    assert ppo_recipe["model"]["path"] == str(out / "sft" / "final")      # handed on between jobs
    assert ppo_recipe["reward"]["path"] == str(out / "reward" / "final")
    assert all((out / s / "stage.json").exists() for s in jobs) and (out / "pipeline_report.md").exists()
    again = ftl(slurm, "pipeline", str(path), "--profile", "tiny", "--slurm", cwd=tmp_path)
    assert again.stdout.count("unchanged and complete: no job") == 3 and stage_jobs(out) == {}


def test_failed_stage_cancels_its_dependants_and_is_named(slurm, tmp_path):
    path = copy_rlhf_pipeline(tmp_path, ("sft", "reward", "ppo"), sft=["data.limit=1"])  # no training example left: fails at run time
    proc = ftl(slurm, "pipeline", str(path), "--profile", "tiny", "--slurm", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "out"
    jobs = stage_jobs(out)
    assert wait_for(slurm, jobs["sft"]["job_id"])["JobState"] == "FAILED"
    for later in ("reward", "ppo"):   # cancelled, not pending forever
        info = wait_for(slurm, jobs[later]["job_id"], timeout=60)
        assert info["JobState"] == "CANCELLED", info
    status = ftl(slurm, "slurm", "status", str(out), cwd=tmp_path)
    assert status.returncode == 1
    assert f"stage 'sft' (job {jobs['sft']['job_id']}) failed" in status.stdout
    assert "stage 'sft' failed (exit" in status.stdout   # the job log's own last lines name it too


def test_cancel_by_job_id_and_status_without_arguments_lists_the_queue(slurm, tiny_recipe, tmp_path):
    recipe = tiny_recipe(train={"max_steps": 400})
    job_id = submitted_id(ftl(slurm, "slurm", "submit", str(recipe), "--time", "10", cwd=tmp_path))
    queue = ftl(slurm, "slurm", "status", cwd=tmp_path)
    assert queue.returncode == 0 and job_id in queue.stdout and "ftl-t-base" in queue.stdout
    cancelled = ftl(slurm, "slurm", "cancel", job_id, cwd=tmp_path)
    assert cancelled.returncode == 0 and f"cancelled {job_id}" in cancelled.stdout
    assert wait_for(slurm, job_id, timeout=60)["JobState"] == "CANCELLED"
    bad = ftl(slurm, "slurm", "status", "not-a-job", cwd=tmp_path)
    assert bad.returncode == 2 and "neither a job id nor a pipeline folder" in bad.stderr
