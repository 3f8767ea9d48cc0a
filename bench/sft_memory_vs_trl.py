"""Peak memory per method (issue #16): SFT on SmolLM2-135M-Instruct, ftl full / LoRA / QLoRA against each other
and against TRL's SFTTrainer with the same method and settings.

Every row: recipes/sft_chat.yaml's data (chatterbot-corpus English chat, split seed 0), rows packed to 256 tokens,
batch 2, STEPS optimizer steps, bf16 autocast over fp32 weights (train.precision bf16 / TRL bf16=True), torch
AdamW, LoRA r 16 / alpha 32 on all linear layers, QLoRA on an NF4 double-quantised base with fp32 compute
(ftl's method.quant defaults; TRL given the same BitsAndBytesConfig through transformers, as a TRL user would).
TRL packs too (packing=True, its default "bfd" strategy, which is padding-free): the same tokens per step as
ftl's packed rows (unpacked, TRL would train on ~50-token rows and the comparison would be of different work).

Each configuration runs in a process of its own, started by this (torch-free) process. Peak = the process's
resident-set high-water mark, VmHWM (ftl: the manifest's `memory.peak_bytes`, ftl.track.memory; TRL: the same
helper read at the end of its run). `baseline` rows are processes that import the same libraries and load
nothing: the CPU runtime every peak includes; the table gives raw peaks and peaks above that baseline.

TRL configurations: `defaults` (gradient_checkpointing=True and bf16=True are TRL's defaults; its loss is
computed from the last hidden state in chunks, never materialising the full logits, in every configuration)
and `best`: everything TRL 1.16 offers for memory that runs on CPU. Checked in the installed source
(trl/trainer/sft_config.py, sft_trainer.py): gradient checkpointing (on by default, full, not `selective`, which
keeps more), padding_free (already forced by bfd packing: `padding_free or packing_strategy in {bfd, bfd_split}`),
the chunked loss (always on: `add_fused_lm_head`), activation_offloading (moves saved activations to CPU memory,
so it cannot lower a CPU peak, and on CPU SFTTrainer fails to start with it: OffloadActivations reads
`torch.accelerator.current_accelerator().type`, None here), use_liger_kernel (deprecated, needs the
liger-kernel package and Triton: not installable for CPU). So on CPU TRL's best memory options are exactly its
defaults, and the `defaults` row is also the `best` one (`trl METHOD best` runs them spelled out:
padding_free=True, gradient_checkpointing=True; `trl lora offload` records activation_offloading's failure).

    python bench/sft_memory_vs_trl.py               # all rows (~8 min on 2 cores)
    python bench/sft_memory_vs_trl.py ftl lora      # one row, printed as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "sft_chat.yaml"
STEPS = 6
BATCH, MAX_LENGTH = 2, 256
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
METHODS = ("full", "lora", "qlora")
GOALS = {"qlora_vs_full": 0.35, "lora_vs_full": 0.45, "vs_trl_defaults": 0.6}

# what `ftl run` imports before it reads a recipe, and what a TRL SFT script imports
BASELINE_IMPORTS = {
    "ftl": "import torch, transformers, accelerate, peft, bitsandbytes, datasets; import ftl.cli, ftl.stages.sft",
    "trl": "import torch, transformers, accelerate, peft, bitsandbytes, datasets; import trl; from trl import SFTConfig, SFTTrainer",
}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


# ---- workers (each in its own process) ----------------------------------------------------------------------
def worker_baseline(kind: str) -> dict:
    exec(BASELINE_IMPORTS[kind])  # noqa: S102 - our own constant
    from ftl.track.memory import peak_rss_bytes, rss_bytes

    return {"peak_bytes": peak_rss_bytes(), "rss_bytes": rss_bytes()}


def ftl_overrides(method: str, out: Path, options: str = "defaults") -> list[str]:
    extra = {"checkpointing": ["model.gradient_checkpointing=true"],  # as TRL's defaults have it
             # + the loss's logits for 128 tokens at a time (exact: same loss and gradients)
             "lean": ["model.gradient_checkpointing=true", "train.loss_chunk_tokens=128"]}.get(options, [])
    return ["--profile", "small", f"method.kind={method}", *extra, f"train.max_steps={STEPS}", f"train.batch_size={BATCH}",
            "train.precision=bf16", "train.optimizer=adamw", "train.save_every=null", f"data.max_length={MAX_LENGTH}",
            "eval.before_training=false", "eval.every=null", "eval.max_examples=2", "eval.batch_size=2",
            "eval.generate.prompts=[]", "eval.generate.from_validation=0", "track.plot=false",
            f"track.output_dir={out}"]


def worker_ftl(method: str, options: str = "defaults") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"ftl-{method}"
        argv = [sys.executable, "-m", "ftl", "run", str(RECIPE), *ftl_overrides(method, out, options)]
        started = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
        if proc.returncode != 0:
            raise RuntimeError(f"ftl {method}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        manifest = json.loads((out / "manifest.json").read_text())
        memory = manifest["memory"]
        marks = memory["per_rank"][memory["peak_rank"]]["marks"]
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [m for m in metrics if "loss" in m and "tokens" in m]
        return {"peak_bytes": memory["peak_bytes"], "training_peak_bytes": marks["trained"]["peak"],
                "measure": memory["measure"], "marks": marks, "planned_bytes": (memory.get("planned") or {}).get("peak_bytes"),
                "gradient_checkpointing": manifest.get("gradient_checkpointing"),
                "trainable_params": manifest["trainable"]["trainable_params"],
                "tokens_per_step": _tokens_per_step(train), "steps": manifest.get("steps"),
                "seconds": round(time.time() - started, 1), "command": " ".join(["ftl", "run", "recipes/sft_chat.yaml",
                                                                                  *ftl_overrides(method, Path("OUT"), options)])}


def _tokens_per_step(rows: list[dict]):
    values = [r["tokens"] for r in rows if "tokens" in r]  # one record per optimizer step, padding not counted
    return sum(values) / len(values) if values else None


def worker_trl(method: str, options: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

    from ftl.config import load_recipe
    from ftl.data import load_splits
    from ftl.models.load import pretrained_dir
    from ftl.track.memory import peak_rss_bytes, rss_bytes

    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    started = time.time()
    recipe = load_recipe(RECIPE, "small", [f"data.max_length={MAX_LENGTH}"])
    splits, _ = load_splits(recipe.data)  # the same records ftl trains on
    train = Dataset.from_list([{"messages": r["messages"]} for r in splits.train])
    folder = pretrained_dir(recipe.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": torch.float32}
    if method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    peft_config = None if method == "full" else LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                           lora_dropout=LORA["dropout"], target_modules="all-linear",
                                                           task_type="CAUSAL_LM")
    extra = {"padding_free": True, "gradient_checkpointing": True} if options == "best" else {}
    if options == "offload":  # activation_offloading: fails on CPU (see the module docstring)
        extra = {"activation_offloading": True}
    tmp = tempfile.mkdtemp()
    args = SFTConfig(output_dir=tmp, use_cpu=True, per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_steps=STEPS, max_length=MAX_LENGTH, packing=True, save_strategy="no", logging_steps=1,
                     report_to="none", seed=0, dataloader_num_workers=0,
                     include_num_input_tokens_seen="non_padding", **extra)
    tokens = []

    class Tokens(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if state.num_input_tokens_seen:
                tokens.append(state.num_input_tokens_seen)

    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Tokens()])
    before = rss_bytes()
    trainer.train()
    return {"peak_bytes": peak_rss_bytes(), "rss_before_train_bytes": before, "measure": "host RSS high-water (VmHWM)",
            "options": {"bf16": args.bf16, "gradient_checkpointing": args.gradient_checkpointing,
                        "gradient_checkpointing_kwargs": args.gradient_checkpointing_kwargs, "packing": args.packing,
                        "packing_strategy": args.packing_strategy, "padding_free": args.padding_free,
                        "activation_offloading": args.activation_offloading, "loss_type": args.loss_type,
                        "use_liger_kernel": args.use_liger_kernel, "optim": str(args.optim)},
            "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
            "tokens_per_step": tokens[-1] / STEPS if tokens else None, "steps": trainer.state.global_step,
            "seconds": round(time.time() - started, 1)}


def worker(argv: list[str]) -> dict:
    kind = argv[0]
    if kind == "baseline":
        return worker_baseline(argv[1])
    if kind == "ftl":
        return worker_ftl(argv[1], argv[2] if len(argv) > 2 else "defaults")
    return worker_trl(argv[1], argv[2] if len(argv) > 2 else "defaults")


# ---- the bench -------------------------------------------------------------------------------------------------
def run(argv: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "FTL_BENCH_WORKER": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"),
                                                                              os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-3000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


CONFIGS = [("baseline", "ftl"), ("baseline", "trl"),
           *(("ftl", m) for m in METHODS),
           *(("ftl", m, "checkpointing") for m in METHODS),
           *(("ftl", m, "lean") for m in ("lora", "qlora")),
           *(("trl", m, "defaults") for m in METHODS),
           ("trl", "lora", "offload")]  # TRL's best memory options on CPU are its defaults (docstring)


def main(only: list[tuple] = ()) -> dict:
    rows = {}
    for config in only or CONFIGS:
        name = " ".join(config)
        print(f"sft_memory_vs_trl: {name} ...", flush=True)
        rows[name] = run(list(config))
        if "peak_bytes" in rows[name]:
            print(f"  peak {gib(rows[name]['peak_bytes'])} GiB ({rows[name].get('seconds')} s)", flush=True)
        else:
            print(f"  {rows[name]['error'][-600:]}", flush=True)
    return summarise(rows)


def summarise(rows: dict) -> dict:
    base = {k: rows[f"baseline {k}"]["peak_bytes"] for k in ("ftl", "trl") if "peak_bytes" in rows.get(f"baseline {k}", {})}
    from importlib.metadata import version

    out = {"name": "sft_memory_vs_trl", "model": "SmolLM2-135M-Instruct", "trl_version": version("trl"), "steps": STEPS, "batch_size": BATCH,
           "max_length": MAX_LENGTH, "precision": "bf16 autocast, fp32 weights", "lora": LORA, "goals": GOALS,
           "baseline_bytes": base, "rows": rows, "methods": {}}
    full = rows.get("ftl full", {}).get("peak_bytes")
    for m in METHODS:
        f, d, b = (rows.get(k, {}) for k in (f"ftl {m}", f"trl {m} defaults", f"trl {m} best"))
        if "peak_bytes" not in b:  # on CPU TRL's best memory options are its defaults (see the docstring)
            b = d
        if "peak_bytes" not in f:
            continue
        entry = {"ftl_peak": f["peak_bytes"], "ftl_above_baseline": f["peak_bytes"] - base.get("ftl", 0)}
        if full:
            entry["share_of_ftl_full"] = f["peak_bytes"] / full
            entry["share_of_ftl_full_above_baseline"] = entry["ftl_above_baseline"] / (full - base.get("ftl", 0))
        for label, t in (("trl_defaults", d), ("trl_best", b)):
            if "peak_bytes" in t:
                entry[f"{label}_peak"] = t["peak_bytes"]
                entry[f"{label}_above_baseline"] = t["peak_bytes"] - base.get("trl", 0)
                entry[f"vs_{label}"] = f["peak_bytes"] / t["peak_bytes"]
                entry[f"vs_{label}_above_baseline"] = entry["ftl_above_baseline"] / entry[f"{label}_above_baseline"]
        for option in ("checkpointing", "lean"):  # ftl with memory options on (see ftl_overrides)
            c = rows.get(f"ftl {m} {option}", {})
            if "peak_bytes" not in c:
                continue
            entry[f"ftl_{option}_peak"] = c["peak_bytes"]
            entry[f"ftl_{option}_above_baseline"] = c["peak_bytes"] - base.get("ftl", 0)
            if full:
                entry[f"{option}_share_of_ftl_full"] = c["peak_bytes"] / full
                entry[f"{option}_share_of_ftl_full_above_baseline"] = \
                    entry[f"ftl_{option}_above_baseline"] / (full - base.get("ftl", 0))
            for label, t in (("trl_defaults", d), ("trl_best", b)):
                if "peak_bytes" in t:
                    entry[f"{option}_vs_{label}"] = c["peak_bytes"] / t["peak_bytes"]
                    entry[f"{option}_vs_{label}_above_baseline"] = \
                        entry[f"ftl_{option}_above_baseline"] / entry[f"{label}_above_baseline"]
        out["methods"][m] = entry
    out["trl_best_options"] = ("gradient_checkpointing=True (default), packing bfd => padding-free (default), chunked "
                               "loss (always); activation_offloading fails on CPU (AttributeError: no accelerator); "
                               "liger kernels need Triton: best == defaults on CPU")
    offload = rows.get("trl lora offload", {})
    if offload:
        out["trl_activation_offloading"] = offload.get("error", "ran")[-300:]
    out["goals_met"] = goals_met(out)
    return out


def goals_met(r: dict) -> dict:
    met = {}
    ms = r["methods"]
    for measure, suffix in (("raw", ""), ("above_baseline", "_above_baseline")):
        res = {}
        if "qlora" in ms and "share_of_ftl_full" in ms["qlora"]:
            res["qlora <= 35% of full"] = ms["qlora"][f"share_of_ftl_full{suffix}"] <= GOALS["qlora_vs_full"]
        if "lora" in ms and "share_of_ftl_full" in ms["lora"]:
            res["lora <= 45% of full"] = ms["lora"][f"share_of_ftl_full{suffix}"] <= GOALS["lora_vs_full"]
        for option in ("checkpointing", "lean"):
            for m, limit in (("qlora", GOALS["qlora_vs_full"]), ("lora", GOALS["lora_vs_full"])):
                if f"{option}_share_of_ftl_full{suffix}" in ms.get(m, {}):
                    res[f"{m} ({option}) <= {100 * limit:.0f}% of full"] = \
                        ms[m][f"{option}_share_of_ftl_full{suffix}"] <= limit
        for m, e in ms.items():
            for option in ("checkpointing", "lean"):
                if f"{option}_vs_trl_defaults{suffix}" in e:
                    res[f"{m} ({option}) <= 0.6x TRL defaults"] = \
                        e[f"{option}_vs_trl_defaults{suffix}"] <= GOALS["vs_trl_defaults"]
                if f"{option}_vs_trl_best{suffix}" in e:
                    res[f"{m} ({option}) <= TRL best"] = e[f"{option}_vs_trl_best{suffix}"] <= 1.0
            if f"vs_trl_defaults{suffix}" in e:
                res[f"{m} <= 0.6x TRL defaults"] = e[f"vs_trl_defaults{suffix}"] <= GOALS["vs_trl_defaults"]
            if f"vs_trl_best{suffix}" in e:
                res[f"{m} <= TRL best"] = e[f"vs_trl_best{suffix}"] <= 1.0
        met[measure] = res
    return met


def table(r: dict) -> str:
    base = r["baseline_bytes"]
    lines = [f"| method | ftl peak GiB (above baseline) | TRL defaults GiB (above) | TRL best GiB (above) | ftl / TRL defaults | "
             f"ftl / TRL best | ftl / ftl full |", "|---|---|---|---|---|---|---|"]
    for m, e in r["methods"].items():
        cell = lambda k: (f"{gib(e[k + '_peak'])} ({gib(e[k + '_above_baseline'])})" if k + "_peak" in e else "-")  # noqa: E731
        ratio = lambda k: (f"{e[k]:.2f} ({e[k + '_above_baseline']:.2f})" if k in e else "-")  # noqa: E731
        lines.append(f"| {m} | {gib(e['ftl_peak'])} ({gib(e['ftl_above_baseline'])}) | {cell('trl_defaults')} | "
                     f"{cell('trl_best')} | {ratio('vs_trl_defaults')} | {ratio('vs_trl_best')} | "
                     f"{ratio('share_of_ftl_full')} |")
        for option in ("checkpointing", "lean"):
            if f"ftl_{option}_peak" in e:
                lines.append(f"| {m}, ftl {option} | {gib(e[f'ftl_{option}_peak'])} "
                             f"({gib(e[f'ftl_{option}_above_baseline'])}) | | | {ratio(f'{option}_vs_trl_defaults')} | "
                             f"{ratio(f'{option}_vs_trl_best')} | {ratio(f'{option}_share_of_ftl_full')} |")
    lines.append(f"baseline (imports only): ftl {gib(base.get('ftl', 0))} GiB, TRL {gib(base.get('trl', 0))} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in ("baseline", "ftl", "trl") and os.environ.get("FTL_BENCH_WORKER"):
        print(json.dumps(worker(args)))
    elif args and args[0] == "--assemble":  # rows measured one by one (python bench/sft_memory_vs_trl.py ftl lora > DIR/ftl_lora.json)
        files = {" ".join(c): Path(args[1]) / ("_".join(c) + ".json") for c in CONFIGS}
        rows = {name: json.loads(f.read_text()) for name, f in files.items() if f.exists() and f.stat().st_size}
        result = summarise(rows)
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        (ROOT / "bench" / "results" / "sft_memory_vs_trl.json").write_text(json.dumps(result, indent=1))
        print(table(result))
    elif args:
        print(json.dumps(run(args), indent=1))
    else:
        result = main()
        out = ROOT / "bench" / "results" / "sft_memory_vs_trl.json"
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        out.write_text(json.dumps(result, indent=1))
        print(table(result))
