"""`make bench`: run every benchmark, write bench/results/NAME.json, print a table, refresh the README's.

Ratios are measured in one run on the same machine (the machine is shared and noisy).
"""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
BENCHES = ["sft_throughput", "zero3_memory", "peft_memory", "ppo_speed", "ppo_vs_trl", "checkpoint_bytes", "loss_memory",
           "plan_accuracy", "sft_memory_vs_trl"]


def table(results: dict[str, dict]) -> str:
    lines = ["| benchmark | measure | ftl | baseline | ratio | goal |", "|---|---|---|---|---|---|"]
    if "sft_throughput" in results:
        r = results["sft_throughput"]
        ftl, trl, best = r["ftl"], r["trl_sfttrainer_defaults"], r.get("trl_sfttrainer_best")
        model = f"{r['model_params'] / 1e6:.1f}M Llama, chatterbot chat, bf16 autocast, {r['steps']} steps, median step"
        met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
        lines.append(f"| SFT throughput vs TRL SFTTrainer defaults ({model}) | real tokens/s | "
                     f"{ftl['tokens_per_s']:.0f} (packed, {ftl['tokens_per_step']:.0f} tokens/step, chunked loss, "
                     f"fused AdamW) | {trl['tokens_per_s']:.0f} (no packing, checkpointing on, batch 8, "
                     f"{trl['tokens_per_step']:.0f} tokens/step) | {r['speedup']:.2f}x | >= 2.5x "
                     f"({met(r['speedup'] >= 2.5)}) |")
        if best is not None:
            lines.append(f"| SFT throughput vs TRL SFTTrainer at its best (the runs above) | real tokens/s | "
                         f"{ftl['tokens_per_s']:.0f} | {best['tokens_per_s']:.0f} (packing=True bfd, "
                         f"padding_free, gradient_checkpointing off, bf16, batch {best['settings']['per_device_train_batch_size']} "
                         f"x {best['settings']['max_length']}, {best['settings']['optim']}; "
                         f"{best['tokens_per_step']:.0f} tokens/step) | {r['speedup_vs_trl_best']:.2f}x | >= 1.5x "
                         f"({met(r['speedup_vs_trl_best'] >= 1.5)}) |")
            compiled = r["ftl_variants"]["compile"]
            lines.append(f"| The same with `train.compile: true` (ftl's blocks compiled; TRL as above, not compiled) | "
                         f"real tokens/s | {compiled['tokens_per_s']:.0f} | {best['tokens_per_s']:.0f} (best); "
                         f"{trl['tokens_per_s']:.0f} (defaults) | {r['speedup_vs_trl_best_compiled']:.2f}x (best); "
                         f"{r['speedup_vs_trl_defaults_compiled']:.2f}x (defaults) | >= 1.5x "
                         f"({met(r['speedup_vs_trl_best_compiled'] >= 1.5)}) |")
        lines.append(f"| SFT model-FLOPs utilisation (the runs above) | 6·N·tokens/s ÷ bf16 matmul peak "
                     f"({r['matmul_peak_gflops']['bf16']:.0f} GFLOP/s) | {100 * ftl['mfu_vs_bf16_peak']:.1f}% | "
                     f"{100 * trl['mfu_vs_bf16_peak']:.1f}% (defaults)"
                     + (f"; {100 * best['mfu_vs_bf16_peak']:.1f}% (best)" if best is not None else "")
                     + f" | | >= 45% ({met(ftl['mfu_vs_bf16_peak'] >= 0.45)}) |")
        if "compile" in (r.get("ftl_variants") or {}):
            mfu_c = r["ftl_variants"]["compile"]["mfu_vs_bf16_peak"]
            lines.append(f"| SFT model-FLOPs utilisation with `train.compile: true` | as above | {100 * mfu_c:.1f}% | | | "
                         f">= 45% ({met(mfu_c >= 0.45)}) |")
        v = r.get("ftl_variants") or {}
        if v:
            parts = []
            for key, label in (("optimizer_impl_for_loop", "single-tensor AdamW (train.optimizer_impl: for_loop)"),
                               ("compile", "train.compile: true"),
                               ("loss_chunk_tokens_0", "plain logits (train.loss_chunk_tokens: 0)")):
                if key in v:
                    parts.append(f"{label} {v[key]['vs_default']:.2f}x (max loss difference "
                                 f"{v[key]['max_loss_difference_vs_default']:.1g})")
            lines.append(f"| ftl SFT settings vs its default (the runs above) | real tokens/s ratio | "
                         f"{'; '.join(parts)} | default 1.00x | | (reported) |")
        p = r.get("profile")
        if p:
            share = lambda d: ", ".join(f"{k} {100 * x:.0f}%" for k, x in d.items() if x >= 0.005)  # noqa: E731
            lines.append(f"| Where ftl's SFT step goes (torch.profiler, {p['steps']} steps of the default run) | "
                         f"share of step time | parts: {share(p['parts'])}; ops: {share(p['ops'])} | | | (reported) |")
        gc = r.get("gradient_checkpointing")
        if gc:
            lines.append(f"| Gradient checkpointing cost where `auto` turns it on ({r['model_params'] / 1e6:.1f}M "
                         f"Llama, {gc['batch'][0]}x{gc['batch'][1]} tokens/step) | real tokens/s | "
                         f"{gc['auto_on']['tokens_per_s']:.0f} (on) | {gc['off']['tokens_per_s']:.0f} (off) | "
                         f"{gc['throughput_on_vs_off']:.2f}x | (reported) |")
        smol = r.get("smollm2")
        if smol:
            lines.append(f"| SFT on {smol['model']} ({r['batch'][0]}x{r['batch'][1]} packed tokens/step) | "
                         f"real tokens/s; MFU | {smol['tokens_per_s']:.0f}; {100 * smol['mfu_vs_bf16_peak']:.1f}% | | | "
                         f"(reported) |")
    if "zero3_memory" in results:
        r = results["zero3_memory"]
        one, two = r["one_rank"]["measured_bytes_per_rank"][0], max(r["two_ranks"]["measured_bytes_per_rank"])
        lines.append(f"| ZeRO-3 model states per rank ({r['two_ranks']['param_numel_full'] / 1e6:.1f}M params, "
                     f"fp32 AdamW, measured from the engine) | bytes per rank, 2 ranks vs 1 | {two / 2**20:.1f} MiB "
                     f"(2 ranks) | {one / 2**20:.1f} MiB (1 rank) | {r['per_rank_ratio_2_vs_1']:.4f} "
                     f"({100 * r['ratio_error_vs_half']:.2f}% off 1/2) | within 5% of 1/2 |")
        lines.append(f"| `ftl plan` vs measured model states | max relative error over 1 and 2 ranks | "
                     f"{100 * r['max_plan_error']:.2f}% | | | <= 10% |")
    if "peft_memory" in results:
        r = results["peft_memory"]
        w, share = r["weights"], r["four_bit_share_of_bf16"]
        mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
        lines.append(f"| Weights of {r['model']} (quantised linear layers / whole model) | bytes | "
                     f"4-bit: {mib(w['4-bit nf4']['linear_bytes'])} / {mib(w['4-bit nf4']['model_bytes'])}; "
                     f"8-bit: {mib(w['8-bit']['linear_bytes'])} / {mib(w['8-bit']['model_bytes'])} | "
                     f"bf16: {mib(w['bf16']['linear_bytes'])} / {mib(w['bf16']['model_bytes'])}; "
                     f"fp32: {mib(w['fp32']['linear_bytes'])} / {mib(w['fp32']['model_bytes'])} | "
                     f"{100 * share['quantised_linear_layers']:.1f}% / {100 * share['whole_model']:.1f}% of bf16 "
                     f"| 4-bit <= 30% of bf16 |")
        shares = ", ".join(f"{k} {100 * v['trainable_share']:.3g}%" for k, v in r["trainable"].items())
        lines.append(f"| Trainable share per method ({r['model']}) | trainable / total parameters | {shares} | "
                     f"full 100% | | |")
        st = r["step_seconds"]
        lines.append(f"| QLoRA step time vs bf16 LoRA ({r['model']}, 2x128 tokens, CPU) | seconds per step | "
                     f"{st['qlora_nf4_bf16_compute']:.2f} s (QLoRA) | {st['lora_bf16']:.2f} s (bf16 LoRA) | "
                     f"{r['qlora_vs_lora_step_time']:.2f}x | (reported) |")
    if "ppo_speed" in results:
        r = results["ppo_speed"]
        for profile, v in r["speed"].items():
            lines.append(f"| PPO speed, {profile} profile (LoRA policy, {v['episodes_per_step']:.0f} episodes/step, "
                         f"~{v['mean_response_tokens']:.0f} response tokens) | episodes/s; generation : training | "
                         f"{v['episodes_per_second']:.2f} episodes/s; {100 * v['generation_share']:.0f}% : "
                         f"{100 - 100 * v['generation_share']:.0f}% ({v['generation_seconds_per_step']:.2f} s : "
                         f"{v['training_seconds_per_step']:.2f} s per step) | | | (reported) |")
        m = r["memory_bytes"]
        lines.append(f"| PPO's four models on SmolLM2-135M, fp32 (policy+LoRA, reference, reward, value) | "
                     f"parameter bytes | {m['total_shared_reference'] / 2**20:.0f} MiB (reference = disabled adapter) | "
                     f"{m['total_copied_reference'] / 2**20:.0f} MiB (reference copy) | "
                     f"{100 * r['memory_saved_by_sharing']:.0f}% less | (reported) |")
    if "ppo_vs_trl" in results:
        r = results["ppo_vs_trl"]
        for run, v in r["runs"].items():
            ftl, trl = v["ftl"], v["trl"]
            model, method = run.split("-")[:2]
            model = f"{r['model_params'] / 1e6:.2f}M Llama" if model == "tiny" else "SmolLM2-135M"
            precision = v.get("precision", "fp32")
            lines.append(f"| PPO vs TRL {r['trl_version']} PPOTrainer ({model}, {method} policy, {precision}, "
                         f"{ftl['episodes_per_step']:.0f} episodes/step, {r['settings']['ppo_epochs']} PPO epochs x "
                         f"{r['settings']['rollout_batch'] // r['settings']['mini_batch']} mini-batches, "
                         f"~{ftl['mean_response_tokens']:.0f} / {trl['mean_response_tokens']:.0f} response tokens, "
                         f"{v['steps']} steps) | episodes/s, training loop (steps after the first) | "
                         f"{ftl['episodes_per_second_loop']:.3g} | {trl['episodes_per_second_loop']:.3g} as it runs; "
                         f"{trl['episodes_per_second_loop_without_gc']:.3g} without its gc.collect() "
                         f"({trl['gc_seconds_per_step']:.2f} s/step) | {v['ratio_loop_vs_trl_without_gc']:.2f}x "
                         f"({v['ratio_loop']:.1f}x as it runs) | >= 1.5x |")
            reuse = v.get("trl_with_ftl_allocator")
            if reuse is not None:
                system = v.get("ftl_system_allocator")
                lines.append(f"| The same, the allocator's share: TRL given ftl's glibc settings; ftl with "
                             f"`host_allocator: system` | episodes/s, training loop | "
                             + (f"{system['episodes_per_second_loop']:.3g} (system) | " if system else "(not run) | ")
                             + f"{reuse['episodes_per_second_loop_without_gc']:.3g} without gc | "
                             f"ftl ÷ TRL, both reusing: {v['ratio_loop_vs_trl_with_ftl_allocator_without_gc']:.2f}x"
                             + (f"; both system: {v['system_allocator_ratio_loop_vs_trl_without_gc']:.2f}x" if system else "")
                             + " | (reported) |")
            lines.append(f"| PPO vs TRL, the same runs: whole command; generation share of the loop; peak RSS | "
                         f"episodes/s (wall clock incl. start-up); %; GiB | "
                         f"{ftl['episodes_per_second_command']:.3g}; {100 * ftl['generation_share']:.0f}%; "
                         f"{ftl['max_rss_bytes'] / 2**30:.2f} GiB | "
                         f"{trl['episodes_per_second_command']:.3g}; {100 * trl['generation_share']:.0f}% "
                         f"({100 * trl['generation_share_without_gc']:.0f}% without gc); "
                         f"{trl['max_rss_bytes'] / 2**30:.2f} GiB | {v['ratio_command']:.2f}x (command) | "
                         f"(reported) |")
            shared = v.get("ftl_shared_critic")
            if shared is not None:
                lines.append(f"| The same, ftl with `ppo.critic: shared` (a value head on the policy's trunk; a "
                             f"different model, which TRL 1.12 cannot run) | episodes/s, training loop; peak RSS | "
                             f"{shared['episodes_per_second_loop']:.3g}; {shared['max_rss_bytes'] / 2**30:.2f} GiB | "
                             f"{trl['episodes_per_second_loop_without_gc']:.3g} without gc; "
                             f"{trl['max_rss_bytes'] / 2**30:.2f} GiB | "
                             f"{v['shared_critic_ratio_loop_vs_trl_without_gc']:.2f}x; "
                             f"{v['shared_critic_rss_vs_trl']:.2f}x RSS | (reported) |")
    if "checkpoint_bytes" in results:
        r = results["checkpoint_bytes"]
        sizes = ", ".join(f"{k} {v['bytes'] / 1e6:.3g} MB" for k, v in r["methods"].items() if k != "full")
        lines.append(f"| Bytes per checkpoint ({r['model']}, AdamW; adapter methods leave the frozen base out) | "
                     f"checkpoint folder | {sizes} | full {r['methods']['full']['bytes'] / 1e6:.0f} MB | "
                     f"LoRA {100 * r['lora_share_of_full']:.2f}% of full | (reported) |")
    if "loss_memory" in results:
        r = results["loss_memory"]
        gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
        for suffix, label in (("", ""), ("_gc", ", activation checkpointing")):
            plain, chunked = r["runs"]["plain" + suffix], r["runs"]["chunk_1024" + suffix]
            lines.append(f"| SFT step memory, chunked loss ({r['model']}, fp32 full fine-tune, AdamW, "
                         f"{r['batch'][0]}x{r['batch'][1]} tokens{label}) | peak RSS (the step's own growth) | "
                         f"{gib(chunked['peak_rss_bytes'])} ({gib(chunked['step_bytes'])}, 1024-token chunks) | "
                         f"{gib(plain['peak_rss_bytes'])} ({gib(plain['step_bytes'])}, plain logits) | "
                         f"{chunked['peak_rss_bytes'] / plain['peak_rss_bytes']:.2f}x peak, "
                         f"{chunked['step_bytes'] / plain['step_bytes']:.2f}x growth | (reported) |")
            lines.append(f"| SFT step time, chunked vs plain loss (the runs above{label}) | seconds, 2nd step | "
                         f"{chunked['step_seconds'][1]:.1f} s | {plain['step_seconds'][1]:.1f} s | "
                         f"{chunked['step_seconds'][1] / plain['step_seconds'][1]:.2f}x | (reported) |")
    if "plan_accuracy" in results:
        r = results["plan_accuracy"]
        worst = max(r["runs"], key=lambda run: abs(run["error"]))
        lines.append(f"| `ftl plan` vs measured peak memory ({len(r['runs'])} CPU runs: sft_chat full/LoRA/QLoRA, "
                     f"classify*, PPO; tiny and small profiles; resident-set high-water) | max relative error | "
                     f"{100 * r['max_abs_error']:.1f}% (`ftl plan --data`; worst: {worst['name']}) | "
                     f"{100 * r['max_abs_bound_error']:.0f}% (`ftl plan`, rows at data.max_length) | | <= 15% |")
    if "sft_memory_vs_trl" in results:
        r = results["sft_memory_vs_trl"]
        base = r["baseline_bytes"]
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        for m, e in r["methods"].items():
            label = {"full": "full fine-tune", "lora": "LoRA", "qlora": "QLoRA (NF4 base, fp32 compute)"}[m]
            goal = {"full": "", "lora": "<= 45% of full; ", "qlora": "<= 35% of full; "}[m]
            ftl = f"{gib(e['ftl_peak'])} ({gib(e['ftl_above_baseline'])}) defaults"
            ratio = f"{e['vs_trl_defaults']:.2f}x ({e['vs_trl_defaults_above_baseline']:.2f}x)"
            if m != "full":
                ratio += (f"; {100 * e['share_of_ftl_full']:.0f}% ({100 * e['share_of_ftl_full_above_baseline']:.0f}%) "
                          f"of ftl full")
            if "ftl_checkpointing_peak" in e:
                ftl += f"; {gib(e['ftl_checkpointing_peak'])} ({gib(e['ftl_checkpointing_above_baseline'])}) checkpointing on"
                ratio += (f"; checkpointing on: {e['checkpointing_vs_trl_defaults']:.2f}x "
                          f"({e['checkpointing_vs_trl_defaults_above_baseline']:.2f}x), "
                          f"{100 * e['checkpointing_share_of_ftl_full']:.0f}% "
                          f"({100 * e['checkpointing_share_of_ftl_full_above_baseline']:.0f}%) of full")
            best = f"; best {gib(e['trl_best_peak'])} ({gib(e['trl_best_above_baseline'])})" if "trl_best_peak" in e else ""
            lines.append(f"| SFT peak memory, {label}, vs TRL {r.get('trl_version', '')} SFTTrainer ({r['model']}, "
                         f"{r['batch_size']}x{r['max_length']} packed tokens, bf16 autocast, {r['steps']} steps; TRL: "
                         f"checkpointing, padding-free bfd packing, chunked loss) | peak RSS GiB (above the "
                         f"{gib(base.get('ftl', 0))} / {gib(base.get('trl', 0))} GiB import baseline) | {ftl} | "
                         f"{gib(e['trl_defaults_peak'])} ({gib(e['trl_defaults_above_baseline'])}) defaults{best} | "
                         f"{ratio} (above baseline in brackets) | {goal}<= 0.6x TRL defaults; <= TRL best |")
    return "\n".join(lines)


def update_readme(text: str) -> None:
    if not README.exists():
        return
    body = README.read_text()
    new = re.sub(r"(<!-- bench:start -->\n).*?(<!-- bench:end -->)", lambda m: m.group(1) + text + "\n" + m.group(2),
                 body, flags=re.S)
    README.write_text(new)


def main(names: list[str]) -> None:
    sys.path.insert(0, str(HERE))
    RESULTS.mkdir(exist_ok=True)
    results = {}
    for name in names or BENCHES:
        started = time.time()
        print(f"bench: {name} ...", flush=True)
        result = importlib.import_module(name).main()
        result["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        result["wall_seconds"] = round(time.time() - started, 1)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=1))
    for path in sorted(RESULTS.glob("*.json")):
        results[path.stem] = json.loads(path.read_text())
    text = table(results)
    print(text)
    update_readme(text)


if __name__ == "__main__":
    main(sys.argv[1:])
