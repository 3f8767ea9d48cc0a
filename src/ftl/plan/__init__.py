"""`ftl plan`: the launch command(s) and a per-device memory estimate, before anything starts: model states,
one micro-batch's activations, the loss's logits, evaluation and generation buffers, RLHF's extra models
and, on CPU, the runtime (the arithmetic and its derivation: ftl.plan.memory).

The plan also decides `model.gradient_checkpointing: auto` (`checkpointing_choice`): a run resolves it
here for the rows its data gives (measured_lengths), so `ftl plan --data` shows the choice the run will
make; a resumed run keeps the choice its contract recorded.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

from ftl.config.schema import Recipe
from ftl.methods import METHODS, STORES_FROZEN_16BIT
from ftl.models.load import pretrained_dir, without_zero_init
from ftl.plan.memory import Estimate, ModelShape, RLWorkload, Setup, Workload, estimate
from ftl.rl.advantages import ESTIMATORS

GB = 1024**3
BNB_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw")
RL_EVAL_REPEATS = 4   # ftl.rl.compare.compare_policies samples each held-out prompt this often
RL_EVAL_PROMPTS = 64  # held-out prompts compared when eval.max_examples is unset (the validation split's size)
# `auto` turns gradient checkpointing on when the activations it removes are at least this share of the
# planned peak (without checkpointing): below it, checkpointing costs a forward pass for little memory
AUTO_CHECKPOINT_SHARE = 0.25
ENCODERS = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet")
CLASSIFIER_HEADS = ("score", "classifier", "lm_head")
FIRST_BLOCK = re.compile(r"(^|\.)(layers|layer|h|blocks)\.0\.")  # a module of the first transformer block


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


def head_of(recipe: Recipe) -> str:
    return "sequence_classification" if recipe.stage in ("classify", "reward") else "causal_lm"


def model_shape(recipe: Recipe) -> ModelShape:
    """Counted on a meta-device model: exact for any architecture, no memory, no weights needed. The head is
    the stage's (a classifier for classify and reward)."""
    import torch
    import transformers

    config = model_config(recipe)
    head = head_of(recipe)
    if head == "sequence_classification":
        config.num_labels = len(recipe.classify.labels or ()) or (1 if recipe.stage == "reward" else 2)
    auto = transformers.AutoModelForSequenceClassification if head == "sequence_classification" else \
        transformers.AutoModelForCausalLM
    with without_zero_init(), torch.device("meta"):  # inside a ZeRO-3 run: no partitioning collective
        model = auto.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    linears = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    quantised = [(name, mod) for name, mod in linears if name.split(".")[-1] not in CLASSIFIER_HEADS]
    targets = recipe.method.lora.target_modules
    lora_targets = quantised if targets == "all-linear" else \
        [(name, mod) for name, mod in linears if name.split(".")[-1] in targets]
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    r = recipe.method.lora.r
    first_block = {name for name, _ in lora_targets if FIRST_BLOCK.search(name)}
    heads = getattr(config, "num_attention_heads", 0)
    lm_head = getattr(model, "lm_head", None)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    return ModelShape(total=total, linear=sum(m.weight.numel() for _, m in quantised), largest_layer=largest,
                      lora=sum(r * (m.in_features + m.out_features) for _, m in lora_targets),
                      num_hidden_layers=getattr(config, "num_hidden_layers", 0),
                      hidden_size=getattr(config, "hidden_size", 0),
                      intermediate_size=getattr(config, "intermediate_size", 0) or 0,
                      num_attention_heads=heads,
                      num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                      vocab_size=getattr(config, "vocab_size", 0), tie_word_embeddings=tied,
                      head_dim=getattr(config, "head_dim", None) or 0, lora_r=r,
                      lora_modules_per_layer=len(first_block), encoder=config.model_type in ENCODERS,
                      attention_dropout=float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0),
                      lm_head=lm_head.weight.numel() if isinstance(lm_head, torch.nn.Linear) and not tied else 0,
                      lora_out_per_layer=sum(m.out_features for name, m in lora_targets if name in first_block))


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
                 grad_accum_fp32=(config.get("data_types") or {}).get("grad_accum_dtype") in FP32_NAMES,
                 # session.training_autocast_dtype: what lets plain LoRA store its frozen linears in bf16
                 lora_frozen_16bit=recipe.method.kind == "lora" and recipe.stage in STORES_FROZEN_16BIT
                 and recipe.train.precision == "bf16")


@dataclass(frozen=True)
class DataLengths:
    """The longest rows a run's data gives (tokens), when known: the training rows (packed or not), the
    examples evaluation batches (unpacked), and RL prompts. Unknown: data.max_length, an upper bound."""
    train: Optional[int] = None
    eval: Optional[int] = None
    prompt: Optional[int] = None


def data_lengths(recipe: Recipe) -> DataLengths:
    """The longest rows of the recipe's own data (`ftl plan --data`), its sources read here."""
    from ftl.data import load_splits
    from ftl.models.load import load_tokenizer, record_texts

    splits, _ = load_splits(recipe.data)
    return measured_lengths(recipe, splits, load_tokenizer(recipe.model, record_texts(splits.train)))


def measured_lengths(recipe: Recipe, splits, tokenizer) -> DataLengths:
    """The longest rows of read data, tokenised as the stage will (training rows packed when the run packs
    them; evaluation examples from the first eval.max_examples of validation and test; RL prompts ready
    for generation)."""
    from ftl.data.packing import pack_sequences
    from ftl.data.tokenize import encode_records, generation_prompt, render_response

    d = recipe.data
    # what evaluation scores: validation while training, and test at the end
    validation = splits.validation[: recipe.eval.max_examples] + splits.test[: recipe.eval.max_examples]

    def ids(texts: list[str], truncate: bool = True) -> list[int]:
        rows = tokenizer(texts, add_special_tokens=recipe.stage == "classify")["input_ids"] if texts else []
        return [min(len(r), d.max_length) if truncate else len(r) for r in rows]

    if recipe.stage in ("sft", "upft"):
        train = encode_records(tokenizer, splits.train, d)
        rows = pack_sequences(train, d.max_length) if _packed(recipe) else train
        return DataLengths(train=max((len(r["input_ids"]) for r in rows), default=None),
                           eval=max((len(r["input_ids"]) for r in encode_records(tokenizer, validation, d)),
                                    default=None))
    if recipe.stage == "classify":
        return DataLengths(train=max(ids([r["text"] for r in splits.train]), default=None),
                           eval=max(ids([r["text"] for r in validation]), default=None))
    if recipe.stage in ("reward", "dpo"):
        pairs = lambda records: [render_response(tokenizer, r, k, d.system_prompt)  # noqa: E731
                                 for r in records for k in ("chosen", "rejected")]
        return DataLengths(train=max(ids(pairs(splits.train)), default=None),
                           eval=max(ids(pairs(validation)), default=None))
    prompts = [generation_prompt(tokenizer, r, d.system_prompt)[0] for r in splits.train]
    return DataLengths(prompt=max(ids(prompts, truncate=False), default=None))


def has_evaluation(recipe: Recipe) -> bool:
    d = recipe.data
    given = d.splits is not None and (d.splits.validation is not None or d.splits.test is not None)
    return given or d.split.validation > 0 or d.split.test > 0


CHUNKED_LOSS_STAGES = ("sft", "upft", "ppo")  # the stages whose causal-LM loss is ftl's (models/chunked_loss.py)


def recipe_workload(recipe: Recipe, checkpointing: bool, lengths: DataLengths = DataLengths()) -> Workload:
    """What one micro-batch, evaluation and generation hold, from the recipe (lengths: data.max_length
    unless the run's data says otherwise)."""
    t, d, ev = recipe.train, recipe.data, recipe.eval
    seq = min(lengths.train or d.max_length, d.max_length)
    eval_seq = min(lengths.eval or d.max_length, d.max_length)
    rl = None
    if recipe.stage in ("ppo", "grpo"):
        reference_copy = not METHODS[recipe.method.kind].disabled_adapter_reference and \
            (recipe.stage == "ppo" or recipe.grpo.beta > 0)
        group = recipe.grpo.num_generations if recipe.stage == "grpo" else recipe.ppo.samples_per_prompt
        prompts = recipe.ppo.rollout_batch if recipe.stage == "ppo" else max(t.batch_size // group, 1)
        rl = RLWorkload(rollout_batch=prompts, samples_per_prompt=group,
                        mini_batch=recipe.ppo.mini_batch if recipe.stage == "ppo" else t.batch_size,
                        prompt_tokens=min(lengths.prompt or d.max_length, d.max_length),
                        response_tokens=recipe.sampling.max_new_tokens, reference_copy=reference_copy,
                        reward_model=recipe.reward is not None and recipe.reward.kind == "model",
                        # a shared critic is a head on the policy: no model, states or activations of its own
                        value_model=recipe.stage == "ppo" and ESTIMATORS[recipe.ppo.advantage].value_model
                        and recipe.ppo.critic == "separate",
                        eval_sequences=(ev.max_examples or RL_EVAL_PROMPTS) * RL_EVAL_REPEATS)
    evaluating = has_evaluation(recipe) and recipe.stage in ("sft", "upft", "classify", "reward")
    prompts = len(ev.generate.prompts) + ev.generate.from_validation if recipe.stage in ("sft", "upft") else 0
    return Workload(batch_size=t.batch_size, seq_len=seq, checkpointing=checkpointing,
                    masked=_packed(recipe) or t.batch_size > 1,
                    # ftl computes these stages' causal-LM losses (chunked); TRL's dpo/grpo do their own
                    loss_chunk_tokens=(t.loss_chunk_tokens or None) if recipe.stage in CHUNKED_LOSS_STAGES else None,
                    head=head_of(recipe), rows_per_example=2 if recipe.stage in ("reward", "dpo") else 1,
                    eval_batch_size=ev.batch_size if evaluating else 0, eval_seq_len=eval_seq if evaluating else 0,
                    generate_batch=1 if prompts else 0, generate_tokens=eval_seq + ev.generate.max_new_tokens,
                    device=recipe.launch.device, stage=recipe.stage, rl=rl,
                    bitsandbytes=bool(METHODS[recipe.method.kind].quant_bits) or t.optimizer in BNB_OPTIMIZERS)


@dataclass(frozen=True)
class CheckpointingChoice:
    on: bool
    auto: bool                # decided by the plan (model.gradient_checkpointing: auto), not set in the recipe
    reason: str
    activations: float = 0.0  # bytes without checkpointing, per device
    checked: float = 0.0      # ... with it
    peak: float = 0.0         # planned peak without checkpointing
    model_states: float = 0.0

    def line(self) -> str:
        return f"ftl: gradient checkpointing {'on' if self.on else 'off'}: {self.reason}"

    def as_manifest(self) -> dict:
        return {"on": self.on, "auto": self.auto, "reason": self.reason,
                "activations_bytes": round(self.activations), "activations_checkpointed_bytes": round(self.checked),
                "planned_peak_without_bytes": round(self.peak), "model_states_bytes": round(self.model_states)}


def decide_checkpointing(setting, unchecked: Estimate, rows: str = "") -> CheckpointingChoice:
    """model.gradient_checkpointing as the run uses it: true/false as set; auto: on when the activations
    checkpointing removes are at least AUTO_CHECKPOINT_SHARE of the planned peak without it. rows: the
    workload the figures are for (workload_rows), said with them."""
    gb = lambda b: f"{b / GB:.2f} GB"  # noqa: E731
    numbers = dict(activations=unchecked.activations_unchecked, checked=unchecked.activations_checked,
                   peak=unchecked.peak, model_states=unchecked.model_states)
    figures = (f"activations {gb(numbers['activations'])} per device ({gb(numbers['checked'])} with it) vs model "
               f"states {gb(numbers['model_states'])}, planned peak {gb(numbers['peak'])} without it"
               + (f", for {rows}" if rows else ""))
    if setting != "auto":
        return CheckpointingChoice(bool(setting), False, f"model.gradient_checkpointing: {str(bool(setting)).lower()} "
                                   f"in the recipe ({figures})", **numbers)
    saved = numbers["activations"] - numbers["checked"]
    share = saved / numbers["peak"] if numbers["peak"] else 0.0
    on = share >= AUTO_CHECKPOINT_SHARE
    return CheckpointingChoice(on, True, f"auto: {figures}; it would save {gb(saved)}, {100 * share:.0f}% of the peak "
                               f"({'>=' if on else '<'} {100 * AUTO_CHECKPOINT_SHARE:.0f}%: "
                               + ("memory wins" if on else "it would only cost time") + ")", **numbers)


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
    matrix: list[tuple[Setup, Estimate, bool]] = field(default_factory=list)  # (setup, estimate, checkpointing)
    checkpointing: Optional[CheckpointingChoice] = None
    workload: Optional[Workload] = None
    lengths: DataLengths = DataLengths()

    @property
    def fits(self) -> bool:
        return self.memory is None or self.chosen.peak <= self.memory


def plan_with_checkpointing(recipe: Recipe, shape: ModelShape, setup: Setup, lengths: DataLengths = DataLengths(),
                            setting=None) -> tuple[Estimate, CheckpointingChoice, Workload]:
    """The estimate with gradient checkpointing as the run will have it (auto resolved by the plan)."""
    setting = recipe.model.gradient_checkpointing if setting is None else setting
    unchecked_work = recipe_workload(recipe, False, lengths)
    unchecked = estimate(shape, setup, unchecked_work)
    # without the data's lengths (`ftl plan` without --data) the rows are data.max_length's, which the real
    # rows may fall far below; a run decides on the lengths its data gives
    known = lengths.prompt if unchecked_work.rl is not None else lengths.train
    rows = workload_rows(unchecked_work) + ("" if known else " (data.max_length, not the data's own lengths)")
    choice = decide_checkpointing(setting, unchecked, rows)
    work = recipe_workload(recipe, choice.on, lengths)
    return (estimate(shape, setup, work) if choice.on else unchecked), choice, work


def workload_rows(w: Workload) -> str:
    """The rows a plan is for, in words."""
    return (f"{w.batch_size} x {w.seq_len} tokens" if w.rl is None else
            f"rollouts {w.rl.rollout_batch * w.rl.samples_per_prompt} x ({w.rl.prompt_tokens} + "
            f"{w.rl.response_tokens}) tokens, updates of {w.rl.mini_batch}")


def make_plan(recipe: Recipe, commands: list[str] = (), lengths: DataLengths = DataLengths(),
              shape: Optional[ModelShape] = None) -> Plan:
    shape, setup = shape or model_shape(recipe), recipe_setup(recipe)
    matrix = []
    for method in ("full", "lora", "qlora"):
        for zero_stage in (0, 1, 2, 3):
            for offload_opt, offload_par in ((False, False), (True, False), (True, True)):
                if (offload_opt and zero_stage == 0) or (offload_par and zero_stage != 3):
                    continue
                s = replace(setup, method=method, zero_stage=zero_stage, deepspeed=setup.deepspeed or zero_stage > 0,
                            offload_optimizer=offload_opt, offload_params=offload_par)
                est, choice, _ = plan_with_checkpointing(recipe, shape, s, lengths)
                matrix.append((s, est, choice.on))
    chosen, choice, work = plan_with_checkpointing(recipe, shape, setup, lengths)
    return Plan(recipe, shape, setup, chosen, device_memory_bytes(recipe), list(commands), matrix, choice, work,
                lengths)


def checkpointing_choice(recipe: Recipe, shape: Optional[ModelShape] = None,
                         lengths: DataLengths = DataLengths()) -> CheckpointingChoice:
    """What a run of this recipe does about gradient checkpointing, and why (for data.max_length's rows
    unless lengths says what the data gives)."""
    shape = shape or model_shape(recipe)
    return plan_with_checkpointing(recipe, shape, recipe_setup(recipe), lengths)[1]


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
    w = plan.workload
    if w is not None and plan.shape.known:
        rows = workload_rows(w)
        chunk = f"loss in chunks of {w.loss_chunk_tokens} tokens" if w.loss_chunk_tokens else "whole-batch logits"
        parts = [f"activations {gb(e.activations)} (checkpointing {'on' if w.checkpointing else 'off'})",
                 f"logits {gb(e.logits)} ({chunk})"]
        if e.autocast_copies:
            parts.append(f"autocast weight copies {gb(e.autocast_copies)}")
        if e.rollout:
            parts.append(f"rollout {gb(e.rollout)}")
        parts.append(f"evaluation {gb(e.evaluation)} (eval batch {w.eval_batch_size} x {w.eval_seq_len})"
                     if w.eval_batch_size else f"evaluation {gb(e.evaluation)}")
        if e.rl_models:
            parts.append(f"reference/reward/value models {gb(e.rl_models)}")
        if e.runtime:
            parts.append(f"CPU runtime {gb(e.runtime)} (measured: Python, torch, data)")
        if e.slack:
            parts.append(f"allocator slack {gb(e.slack)}")
        lines.append(f"per micro-batch ({rows}): " + ", ".join(parts) + f" -> peak {gb(e.peak)}")
        if plan.lengths == DataLengths() and not (w.rl is None and _packed(r)):
            lines.append(f"(rows at data.max_length {r.data.max_length}: an upper bound where rows are not packed "
                         "to it; `ftl plan --data` reads the data for its longest rows, and a run records the plan "
                         "for its own rows in its manifest)")
        elif plan.lengths != DataLengths():
            known = {k: v for k, v in asdict(plan.lengths).items() if v}
            lines.append("(rows from the data: longest " + ", ".join(f"{k} {v} tokens" for k, v in known.items())
                         + ")")
    if plan.checkpointing is not None:
        lines.append(plan.checkpointing.line())
    if plan.memory is not None:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"device memory {gb(plan.memory)} GB: {verdict} "
                     f"({100 * e.peak / plan.memory:.0f}% at the planned peak, "
                     f"{100 * e.device_total / plan.memory:.0f}% for model states)")
    lines += ["", f"| method | ZeRO | offload | checkpointing | model states GB | activations GB | peak GB "
                  f"({s.devices} devices) | host GB per device |",
              "|---|---|---|---|---|---|---|---|"]
    for setup, est, checked in plan.matrix:
        offload = "opt+params" if setup.offload_params else ("optimizer" if setup.offload_optimizer else "-")
        mark = " *" if (setup.method, setup.zero_stage, setup.offload_optimizer, setup.offload_params) == \
            (s.method, s.zero_stage, s.offload_optimizer, s.offload_params) else ""
        lines.append(f"| {setup.method}{mark} | {setup.zero_stage} | {offload} | {'on' if checked else 'off'} | "
                     f"{gb(est.device_total)} | {gb(est.activations + est.logits)} | {gb(est.peak)} | {gb(est.host)} |")
    lines.append("(* = this recipe; model states include ZeRO buffers; activations include the loss's logits; peak = "
                 "model states + the larger of one micro-batch's training and evaluation + RL models"
                 + (" + the CPU runtime" if r.launch.device == "cpu" else "") + ")")
    return "\n".join(lines)


def _packed(recipe: Recipe) -> bool:
    return recipe.data.packing and METHODS[recipe.method.kind].packs and recipe.stage in ("sft", "upft")
