"""PPO's adaptive KL coefficient (`ppo.kl_target`, ftl.rl.kl_control): the rule against hand-computed values,
and a tiny run whose logged coefficient follows it step by step and resumes from a checkpoint where it was."""

import shutil

import pytest

from conftest import read_jsonl, run_ftl, tiny_ppo_recipe
from ftl.rl.kl_control import next_kl_coef


def test_the_coefficient_follows_the_kl_by_at_most_20_percent_a_step():
    assert next_kl_coef(0.1, kl=1.1, target=1.0) == pytest.approx(0.11)   # 10% over the target: 10% more
    assert next_kl_coef(0.1, kl=3.0, target=1.0) == pytest.approx(0.12)   # far over: capped at +20%
    assert next_kl_coef(0.1, kl=0.95, target=1.0) == pytest.approx(0.095)
    assert next_kl_coef(0.1, kl=-0.5, target=1.0) == pytest.approx(0.08)  # an estimate below 0: capped at -20%
    assert next_kl_coef(0.1, kl=3.0, target=None) == 0.1                 # no target: fixed


@pytest.mark.slow
def test_an_adaptive_coefficient_is_logged_applied_and_resumed(tiny_recipe, tmp_path):
    recipe = tiny_ppo_recipe(tiny_recipe, "adaptive", "gae", 1)
    args = ["ppo.kl_target=0.5", "train.max_steps=6", "train.save_every=3"]
    straight = run_ftl("run", str(recipe), *args, cwd=tmp_path, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    coefs = [r["kl_coef"] for r in rows]
    assert len(rows) == 6 and coefs[0] == 0.05
    for row, following in zip(rows, coefs[1:]):  # each step's coefficient from the step before's mean KL
        assert following == pytest.approx(next_kl_coef(row["kl_coef"], row["kl"], 0.5), rel=1e-12)
    assert len(set(coefs)) == 6, coefs  # it moved every step (the KL never sat exactly on the target)

    cut = tmp_path / "cut"  # a kill after step 3: only that checkpoint left
    shutil.copytree(tmp_path / "run", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    resumed = run_ftl("run", str(recipe), *args, f"track.output_dir={cut}", "--resume", cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = read_jsonl(cut / "metrics.jsonl")
    for key in ("kl_coef", "kl", "reward", "policy_loss", "value_loss"):
        assert [r[key] for r in again] == [r[key] for r in rows], key
