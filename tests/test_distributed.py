"""`ftl launch` on 2 CPU processes over gloo: real world size 2, synchronised gradients, learning."""

import json

from conftest import run_ftl, tiny_recipe_dict, train_losses, write_recipe


def test_dry_run_prints_the_accelerate_command(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", launch={"num_processes": 2, "main_process_port": 29911})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_ftl("launch", str(path), "--dry-run", "train.lr=0.001", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.split("ftl: launch command:\n")[1].splitlines()[0]
    assert "accelerate launch --multi_gpu" in line and "--num_processes 2" in line
    assert "--main_process_port 29911" in line and "--cpu" not in line
    assert line.endswith(f"-m ftl run {path} train.lr=0.001")
    assert "OMP_NUM_THREADS=1" in line
    assert not (tmp_path / "run").exists()


def test_two_rank_launch_trains_in_sync(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", launch={"num_processes": 2},
                              train={"max_steps": 12, "batch_size": 2, "save_every": 6})
    del recipe["launch"]["main_process_port"]   # ftl launch picks a free one
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_ftl("launch", str(path), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    chosen = int(proc.stdout.split("--main_process_port ")[1].split()[0])
    assert manifest["main_process_port"] == chosen   # the port the ranks really met on
    checks = manifest["rank_checks"]
    assert sorted(c["rank"] for c in checks) == [0, 1]
    assert all(c["world_size"] == 2 for c in checks)
    assert checks[0]["param_digest"] == checks[1]["param_digest"]  # gradients were all-reduced
    memory = manifest["memory"]  # each rank measured its own peak; the run's is the larger
    assert len(memory["per_rank"]) == 2 and memory["peak_bytes"] == max(r["peak_bytes"] for r in memory["per_rank"])
    assert all(r["peak_bytes"] > r["marks"]["data"]["now"] > 0 for r in memory["per_rank"])
    losses = train_losses(tmp_path / "run")
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 0.4, losses
    # each optimizer step consumed 2 ranks x 2 packs: tokens logged are the sum over both ranks
    tokens = [json.loads(line)["tokens"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "tokens" in line]
    assert min(tokens) > 2 * 2 * 40
