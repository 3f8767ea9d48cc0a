"""`ftl plan`: the launch command(s) and a per-device memory estimate, before anything starts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ftl.config.schema import Recipe
from ftl.methods import METHODS
from ftl.models.load import pretrained_dir
from ftl.plan.memory import Estimate, ModelShape, Setup, estimate

GB = 1024**3


def model_config(recipe: Recipe):
    from transformers import AutoConfig, LlamaConfig

    m = recipe.model
    if m.architecture:
        arch = dict(m.architecture)
        return AutoConfig.for_model(arch.pop("model_type"), **arch)
    if m.source == "tiny":
        t = m.tiny
        return LlamaConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                           num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                           num_key_value_heads=t.num_key_value_heads, vocab_size=t.vocab_size,
                           tie_word_embeddings=False)
    return AutoConfig.from_pretrained(pretrained_dir(m, config_only=True))  # a hub model: config.json, no weights


def model_shape(recipe: Recipe) -> ModelShape:
    """Counted on a meta-device model: exact for any architecture, no memory, no weights needed."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(recipe))
    total = sum(p.numel() for p in model.parameters())
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    quantised = [mod for name, mod in linears if not name.endswith("lm_head")]
    targets = recipe.method.lora.target_modules
    lora_targets = quantised if targets == "all-linear" else \
        [mod for name, mod in linears if name.split(".")[-1] in targets]
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    r = recipe.method.lora.r
    return ModelShape(total=total, linear=sum(m.weight.numel() for m in quantised), largest_layer=largest,
                      lora=sum(r * (m.in_features + m.out_features) for m in lora_targets))


FP32_NAMES = ("fp32", "float32", "float", "torch.float32")  # DeepSpeed's DtypeEnum spellings of fp32


def recipe_setup(recipe: Recipe) -> Setup:
    """What the plan counts, as the recipe and its DeepSpeed JSON (launch.deepspeed) say."""
    config, deepspeed = {}, bool(recipe.launch.deepspeed)
    if deepspeed and Path(recipe.launch.deepspeed).is_file():
        config = json.loads(Path(recipe.launch.deepspeed).read_text())
    zero = config.get("zero_optimization", {})
    return Setup(method=METHODS[recipe.method.kind].plan_family, zero_stage=int(zero.get("stage", 0)),
                 devices=recipe.launch.num_processes * recipe.launch.num_machines, deepspeed=deepspeed,
                 precision=recipe.train.precision, model_dtype=recipe.model.dtype, optimizer=recipe.train.optimizer,
                 offload_optimizer=(zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme"),
                 offload_params=(zero.get("offload_param") or {}).get("device") in ("cpu", "nvme"),
                 grad_accum_fp32=(config.get("data_types") or {}).get("grad_accum_dtype") in FP32_NAMES)


def device_memory_bytes(recipe: Recipe) -> Optional[float]:
    if recipe.launch.device_memory_gb:
        return recipe.launch.device_memory_gb * GB
    if recipe.launch.device == "cpu":  # CPU ranks share the machine's memory
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / recipe.launch.num_processes
    return None


@dataclass
class Plan:
    recipe: Recipe
    shape: ModelShape
    setup: Setup
    chosen: Estimate
    memory: Optional[float]
    commands: list[str] = field(default_factory=list)
    matrix: list[tuple[Setup, Estimate]] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.memory is None or self.chosen.device_total <= self.memory


def make_plan(recipe: Recipe, commands: list[str] = ()) -> Plan:
    shape, setup = model_shape(recipe), recipe_setup(recipe)
    matrix = []
    for method in ("full", "lora", "qlora"):
        for zero_stage in (0, 1, 2, 3):
            for offload_opt, offload_par in ((False, False), (True, False), (True, True)):
                if (offload_opt and zero_stage == 0) or (offload_par and zero_stage != 3):
                    continue
                s = replace(setup, method=method, zero_stage=zero_stage, deepspeed=setup.deepspeed or zero_stage > 0,
                            offload_optimizer=offload_opt, offload_params=offload_par)
                matrix.append((s, estimate(shape, s)))
    return Plan(recipe, shape, setup, estimate(shape, setup), device_memory_bytes(recipe), list(commands), matrix)


def render_plan(plan: Plan) -> str:
    r, s, e = plan.recipe, plan.setup, plan.chosen
    gb = lambda b: f"{b / GB:,.2f}"  # noqa: E731
    lines = [f"ftl plan: {r.name} (profile {r.profile or 'base'}): {plan.shape.total / 1e6:,.1f}M parameters, "
             f"{s.devices} device(s) ({r.launch.num_machines} x {r.launch.num_processes} {r.launch.device}), "
             f"method {r.method.kind}, {s.precision}, {s.optimizer}, "
             + (f"DeepSpeed ZeRO-{s.zero_stage}" if s.deepspeed else "no ZeRO (replicated)")
             + (" + optimizer offload" if s.offload_optimizer else "") + (" + param offload" if s.offload_params else "")]
    for command in plan.commands:
        lines.append(f"launch: {command}")
    lines.append("per-device memory for this recipe (GB): "
                 f"params {gb(e.params)}, grads {gb(e.grads)}, "
                 + (f"fp32 grad accumulation {gb(e.grad_accum)}, " if e.grad_accum else "")
                 + f"fp32 master {gb(e.master)}, optimizer {gb(e.optimizer)}, fp32 grad copy {gb(e.fp32_grad_copy)}, "
                 f"ZeRO-3 gather buffer {gb(e.gather_buffer)} -> total {gb(e.device_total)}"
                 + (f"; offloaded to host {gb(e.host)}" if e.host else ""))
    if plan.memory is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"device memory {gb(plan.memory)} GB: {verdict} "
                     f"({100 * e.device_total / plan.memory:.0f}% before activations)")
    lines += ["", f"| method | ZeRO | offload | device GB ({s.devices} devices) | host GB per device |",
              "|---|---|---|---|---|"]
    for setup, est in plan.matrix:
        offload = "opt+params" if setup.offload_params else ("optimizer" if setup.offload_optimizer else "-")
        mark = " *" if (setup.method, setup.zero_stage, setup.offload_optimizer, setup.offload_params) == \
            (s.method, s.zero_stage, s.offload_optimizer, s.offload_params) else ""
        lines.append(f"| {setup.method}{mark} | {setup.zero_stage} | {offload} | {gb(est.device_total)} | {gb(est.host)} |")
    lines.append("(* = this recipe; model states + ZeRO buffers only, activations not included)")
    return "\n".join(lines)
