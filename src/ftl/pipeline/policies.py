"""A pipeline's policies side by side (PPO, RLOO, REINFORCE++, DPO, GRPO, ...): every policy stage compared
with the model it started from on the same held-out prompts drawn with the same sampling settings (the first
policy stage's), scored by its own reward model and by the pipeline's judge — a reward model trained on a
share of the data no policy saw — in one table of reward, judge reward, win rates, KL, wall time and peak
memory. A win under the stages' reward model that the judge does not confirm is said so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ftl import run_dir as layout
from ftl.config.stages import STAGES

JUDGE_DIR = "judge"          # STAGE_DIR/judge/eval.json: the judge's re-scoring of the stage's comparison
JUDGE_STAMP = "judged.json"  # what was judged (stage, judge, common prompts): an unchanged rerun skips it


def judge_policies(plans, judge) -> None:
    """Compare every policy stage with its starting model on the first policy stage's held-out prompts and
    sampling, scored by the judge and by the stage's own reward (`ftl eval STAGE --reward JUDGE --prompts-from
    FIRST`: for the first stage, the very responses of its own end-of-run comparison)."""
    from ftl.evaluate.target import evaluate_target  # torch loads only when a pipeline has a judge
    from ftl.pipeline import fingerprint  # the package imports this module first

    policies = [plan for plan in plans if plan is not judge and STAGES[plan.recipe.stage].policy]
    if not policies:
        return
    first = policies[0]
    # what picks and draws the common comparison: the first policy stage's data, eval size and sampling
    prompts = fingerprint({"data": first.recipe.data.model_dump(), "max_examples": first.recipe.eval.max_examples,
                           "sampling": first.recipe.sampling.model_dump()}, {})
    for plan in policies:
        out = plan.stage_dir / JUDGE_DIR
        stamp = {"stage": plan.fingerprint, "judge": judge.fingerprint, "prompts": prompts}
        if (out / "eval.json").exists() and (out / JUDGE_STAMP).exists() and \
                json.loads((out / JUDGE_STAMP).read_text()) == stamp:
            continue
        print(f"ftl pipeline: judging stage '{plan.name}' with '{judge.name}' ({judge.output})", flush=True)
        evaluate_target(str(plan.stage_dir), out=str(out), reward=str(judge.output), prompts_from=str(first.stage_dir))
        (out / JUDGE_STAMP).write_text(json.dumps(stamp))


def read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def verdict(own: dict, judged: Optional[dict]) -> str:
    if judged is None:
        return "-"
    wins, confirmed = own["win_rate"] > 0.5, judged["win_rate"] > 0.5
    if wins and not confirmed:
        return "reward-model win NOT confirmed by the judge"
    if wins and judged.get("finished_win_rate") is not None:
        # the judge's win rate counts the missing-EOS penalty; where both answers ended, only their content counts
        return ("win confirmed" if judged["finished_win_rate"] > 0.5 else
                "win confirmed only by finished answers (where both finished, the judge does not prefer the policy)")
    if wins and judged["mean_raw_score"] <= judged["reference_mean_raw_score"]:
        # a comparison written before finished_win_rate existed: the judge's own score of the answers did not rise
        return "win confirmed only by finished answers (judge score not higher)"
    if wins:
        return "win confirmed"
    return "no win"


def finished_cell(judged: Optional[dict]) -> str:
    """The judge's win rate over the pairs where both responses ended with EOS, its binomial standard error (a
    few dozen pairs: 0.58 of 52 is 0.07 from even) and how many pairs there were."""
    if not judged or judged.get("finished_win_rate") is None:
        return "-"
    rate, pairs = judged["finished_win_rate"], judged["finished_pairs"]
    return f"{rate:.2f} ± {(rate * (1 - rate) / pairs) ** 0.5:.2f} ({pairs})"


def policies_table(root: Path, stage_names: list[str]) -> list[str]:
    """Markdown lines: one row per policy stage that has finished its comparison (empty when none has). Rows
    come from the judge's common comparison where the pipeline has a judge, else from each stage's own."""
    rows, common = [], []
    for name in stage_names:
        stage_dir = root / name
        evaluation, manifest = read_json(stage_dir / "eval.json"), read_json(stage_dir / layout.MANIFEST_FILE)
        if not evaluation or not manifest or "win_rate" not in evaluation.get("after", {}):
            continue
        judged = (read_json(stage_dir / JUDGE_DIR / "eval.json") or {}).get("eval")
        own = judged["run_reward"] if judged and "run_reward" in judged else evaluation["after"]
        if judged and "prompts_from" in judged:
            common.append((Path(judged["prompts_from"]).name, judged["responses"]))
        stamp = read_json(stage_dir / "stage.json") or {}
        method = (manifest.get("ppo") or {}).get("advantage") or manifest["stage"]
        peak = (manifest.get("memory") or {}).get("peak_bytes")
        rows.append(f"| {name} | {method} | {own['mean_reward']:.3f} (start {own['reference_mean_reward']:.3f}) | "
                    f"{own['win_rate']:.2f} | "
                    + (f"{judged['mean_raw_score']:.3f} (start {judged['reference_mean_raw_score']:.3f}) | "
                       f"{judged['win_rate']:.2f} | " if judged else "- | - | ")
                    + f"{finished_cell(judged)} | "
                    + f"{(judged or own)['kl_to_reference']:.3f} | {stamp.get('seconds', '-')} | "
                    f"{f'{peak / 2**30:.2f}' if peak else '-'} | {verdict(own, judged)} |")
    if not rows:
        return []
    if len(common) == len(rows) and len(set(common)) == 1:
        (first, responses), = set(common)
        where = (f"Every policy on the same held-out prompts, those of stage '{first}', drawn with its sampling "
                 f"settings and the same seeds ({responses} responses per policy), each against the model it started "
                 "from on those prompts.")
    else:
        where = ("Each policy on its own recipe's held-out prompts and sampling settings, against the model it "
                 "started from on the same prompts with the same seeds (a different data share or temperature shows "
                 "as a different start).")
    return ["", "## Policies side by side", "", where + " "
            "Reward: as optimised (the stages' reward model + missing-EOS penalty); judge: a reward model trained "
            "on a share of the data no stage saw (raw score). Judge, both finished: the judge's win rate over the "
            "pairs where both responses ended with EOS, with its binomial standard error and their count: finishing "
            "alone cannot win it. KL: exact, per response, to the starting model.", "",
            "| stage | algorithm | reward (start) | win rate | judge score (start) | judge win rate | "
            "judge, both finished ± s.e. (pairs) | KL (nats) | wall time (s) | peak memory (GiB) | verdict |",
            "|---|---|---|---|---|---|---|---|---|---|---|"] + rows
