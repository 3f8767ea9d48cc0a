"""PPO episodes per second and the generation / training split (tiny and small profiles), and the memory
of PPO's four models (policy, reference, reward, value) with and without sharing the reference as the
LoRA policy's disabled adapter.

Reward: a known function of the text (so no reward-model training is needed to time PPO); value model
initialised from the policy. Steps after the first are timed.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"tiny": 8, "small": 4}


def timed_run(profile: str, out: Path) -> dict:
    run_dir = out / f"ppo-{profile}"
    model = [f"model.source={'tiny' if profile == 'tiny' else 'smollm2'}", "model.path=null"]
    argv = [sys.executable, "-m", "ftl", "run", str(ROOT / "recipes/rlhf/ppo.yaml"), "--profile", profile,
            f"track.output_dir={run_dir}", "ppo.value_from=policy", "reward.missing_eos_penalty=null",
            "reward={kind: function, function: 'ftl.rl.reward_functions:count_substring'}",
            f"train.max_steps={STEPS[profile]}", "eval.max_examples=1", "method.kind=lora", *model]
    subprocess.run(argv, cwd=out, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    gen, train = sum(r["generation_seconds"] for r in rows), sum(r["training_seconds"] for r in rows)
    episodes = sum(r["episodes"] for r in rows)
    return {"episodes_per_second": episodes / (gen + train), "generation_share": gen / (gen + train),
            "generation_seconds_per_step": gen / len(rows), "training_seconds_per_step": train / len(rows),
            "episodes_per_step": episodes / len(rows), "mean_response_tokens":
                sum(r["response_length"] for r in rows) / len(rows)}


def four_model_bytes() -> dict:
    """Parameter bytes of the four PPO models on SmolLM2-135M (LoRA policy, fp32)."""
    from ftl.config.schema import MethodConfig, ModelConfig
    from ftl.methods import apply_method
    from ftl.models.load import load_model, pretrained_dir

    cfg = ModelConfig(source="smollm2")
    base = pretrained_dir(cfg)
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    policy = apply_method(load_model(cfg, base), MethodConfig(kind="lora"))
    reward = load_model(cfg, base, head="sequence_classification")
    value = load_model(cfg, base, head="sequence_classification")
    reference_copy = copy.deepcopy(policy.get_base_model())
    shared = size(policy) + size(reward) + size(value)
    return {"policy": size(policy), "reference_copy": size(reference_copy), "reward": size(reward),
            "value": size(value), "total_shared_reference": shared,
            "total_copied_reference": shared + size(reference_copy)}


def main() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        speed = {profile: timed_run(profile, Path(tmp)) for profile in STEPS}
    memory = four_model_bytes()
    return {"name": "ppo_speed", "speed": speed, "memory_bytes": memory,
            "memory_saved_by_sharing": 1 - memory["total_shared_reference"] / memory["total_copied_reference"]}
