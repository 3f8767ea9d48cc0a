"""Per-device memory of a run: model states (by method, precision, optimizer, ZeRO stage and offload), the
activations of one micro-batch, the loss's logits, evaluation and generation buffers, RLHF's extra models,
and on CPU the runtime itself. `estimate(shape, setup, workload)` adds them up to the planned peak.

Model states
------------
The ZeRO paper's accounting (Rajbhandari et al. 2020): mixed-precision Adam holds 2 bytes of 16-bit
parameters, 2 of 16-bit gradients and 12 of fp32 master weights + momentum + variance per parameter
(16 bytes); stage 1 partitions the 12, stage 2 also the gradients, stage 3 also the parameters.
DeepSpeed additionally keeps an fp32 copy of each gradient partition while stepping (its estimator's
18 bytes) and gathers one layer at a time under stage 3; both are counted here as separate terms.

With `data_types.grad_accum_dtype: fp32` in the DeepSpeed JSON (16-bit training, ZeRO 1-3), gradients
accumulate across micro-batches in an fp32 buffer instead of the 16-bit one (DeepSpeed 0.19.8): stage 3
allocates its gradient partitions in fp32 (and still copies them to fp32 at the step), stage 2 keeps an
fp32 partition that is itself the step's fp32 gradient, stage 1 (BF16_Optimizer) an unpartitioned fp32
buffer, whose partition is the step's gradient, beside the 16-bit gradients it zeroes after each
micro-batch.

Activations of a Llama-style block (sdpa attention), per token
--------------------------------------------------------------
What autograd saves for backward in one decoder layer, counted by storage with
`torch.autograd.graph.saved_tensors_hooks` on SmolLM2's shape and checked against this list; h = hidden
size, i = intermediate size, kv = key/value heads x head_dim, c = bytes of the compute dtype (2 under
bf16/fp16 autocast or with 16-bit weights, else 4), s = bytes of the residual stream (the weights' dtype):

    residual stream        the layer's input and the post-attention sum          2 s h
    RMSNorm (fp32 inside)  x * rsqrt(var) of both norms                          2 * 4 h   (+ 2 * 4 h: the
                           fp32 upcast of a 16-bit input)
    linear inputs          both norms' outputs in the compute dtype              2 c h
    attention              q and k after RoPE, v; sdpa's output (also o_proj's   c (2 h + 2 kv')
                           input). kv' = h when sdpa gets a mask (packed or padded rows: transformers
                           repeats k and v to every head), else kv. The flash kernels (CPU and CUDA) keep
                           only a logsumexp per head: no T x T matrix.
    MLP (SwiGLU)           gate, up, silu(gate), silu(gate) * up                  4 c i
    LoRA                   each adapted linear's r-wide down-projection          c r per module

fp32 with a mask: (10 h + 4 i) * 4 bytes; SmolLM2-135M (h 576, i 1536): 47.6 KB per token per layer
(48.7 KB counted). Under bf16 autocast with fp32 weights: 28 h + 8 i bytes, and every linear weight's
16-bit copy is saved for backward too (2 bytes per linear parameter, alive for the whole step).
A BERT-style encoder block (LayerNorm, GELU, dropout) saves about (8 h + 2 i) * 4 bytes plus, with
attention dropout (sdpa then takes its math path), heads x T x 9 bytes of probabilities and masks.

Gradient checkpointing (non-reentrant, one checkpoint per decoder layer, as transformers applies it)
keeps only each layer's input, L * s h per token, and recomputes one layer at a time in backward, whose
full set is alive then: L * s h + (one layer's bytes) per token instead of L * (one layer's bytes).

Logits and the loss
-------------------
The causal-LM loss sees B x T x V logits in the compute dtype, then fp32 copies (`float()`, the reshape of
the shifted view) and log_softmax's fp32 output saved for backward; in backward the fp32 gradients of the
same shapes: three fp32 copies (12 bytes) per logit at the worst moment, plus the 16-bit original under
autocast (14). A chunked loss (`loss_chunk_tokens` K > 0) holds only K tokens' logits at a time:
12-14 bytes * min(K, B T) * V. A classification or reward head has
B x labels logits (negligible).

Evaluation and generation
-------------------------
No backward: one eval batch's logits (12-14 bytes * B_eval * T_eval * V, the eval loss takes the same
fp32 copies) and one layer's transient (about (3 i + 4 h) c per token). Generation holds a KV cache of
2 * L * kv * c bytes per cached token per sequence.

RLHF (ppo, grpo)
----------------
Beside the policy (the recipe's method): the reference (the same model with its adapter disabled: nothing;
else a frozen copy of the weights), the reward model (its weights, when it is a model), and PPO's value
model (a full model with a scalar head, every weight trained: weights, gradients and AdamW's two moments,
16 bytes per parameter in fp32, and AdamW's temporary at the step). Three phases, one at a time:
- rollout (no grad): generation's KV cache for rollout_batch x (prompt + response), then scoring forwards
  holding the policy's logits over every sequence and fp32 log-softmaxes over the responses;
- update: the policy's activations (checkpointed or not) and the value model's over mini_batch sequences,
  the policy's logits and 4 fp32 copies over the responses (temperature, log-softmax, entropy);
- the end-of-run comparison (ftl.rl.compare): held-out prompts x 4 repeats sampled by both policies, one
  model's full logits and both fp32 log-softmaxes, or five fp32 response-sized tensors at the per-token KL.

CPU
---
On CPU the "device" is host memory, and a rank's resident set holds more than tensors:
- the runtime: Python, torch, transformers, PEFT, the data and tokenizer, and what the stage's evaluation
  imports (classify: scikit-learn, SciPy). RUNTIME_CPU_BYTES, measured per stage on this machine kind
  (the tiny profiles' peaks less their tiny tensors; bench/plan_accuracy.py);
- glibc's fragmentation: a forward pass allocates every block's intermediates in turn (whether checkpointing
  keeps them or not; LoRA adds its out-sized temporaries per adapted linear), and glibc keeps a share of
  those bytes resident for the rest of the run (ALLOCATOR_SLACK, calibrated on real runs: with
  MALLOC_MMAP_THRESHOLD_ forcing every block to be returned the same runs peak that much lower, and step
  about 1.5x slower). Evaluation's large buffers are mmapped and returned, and ftl hands freed memory back
  at phase boundaries (ftl.track.memory.release_freed_memory), so phases do not stack.
On GPU the peak is torch.cuda.max_memory_allocated: tensors only, no runtime or slack term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

NF4_BYTES = 0.5 + (1 + 4 / 256) / 64  # 4-bit weights + double-quantised absmax per 64-block

# Calibrated on this machine kind (bench/plan_accuracy.py; see results/plan_accuracy.json)
MB = 1024**2
# RSS of a rank beside its tensors, by stage: Python, torch, transformers, PEFT, the data, and what the stage's
# evaluation imports (classify: scikit-learn and SciPy)
RUNTIME_CPU_BYTES = {"sft": 500 * MB, "classify": 595 * MB, "ppo": 455 * MB}
BNB_RUNTIME_BYTES = 0 * MB          # ... and bitsandbytes' libraries, when a method or optimizer imports it
LOGIT_FP32_COPIES = 3               # fp32 copies of the logits alive at the loss's worst moment
ALLOCATOR_SLACK = 0.45              # CPU: share of a forward's block allocations glibc keeps resident


@dataclass(frozen=True)
class ModelShape:
    total: int               # all parameters
    linear: int              # nn.Linear weights a 4-bit quantiser replaces (all but lm_head)
    largest_layer: int       # the largest single module's parameters (ZeRO-3 gathers one at a time)
    lora: int                # LoRA parameters for the recipe's rank and targets
    # the architecture (config.json), what activations scale with; 0 = unknown (model states only)
    num_hidden_layers: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    num_attention_heads: int = 0
    num_key_value_heads: int = 0
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    head_dim: int = 0                 # 0: hidden_size // num_attention_heads
    lora_r: int = 0
    lora_modules_per_layer: int = 0   # linear layers LoRA adapts in one block
    encoder: bool = False             # a BERT-style encoder (LayerNorm, GELU, dropout), not a Llama-style decoder
    attention_dropout: float = 0.0
    lm_head: int = 0                  # lm_head parameters (0 when tied to the embedding)
    lora_out_per_layer: int = 0       # output features of the linear layers LoRA adapts in one block

    @property
    def kv_width(self) -> int:
        heads = self.num_key_value_heads or self.num_attention_heads
        return heads * (self.head_dim or self.hidden_size // max(self.num_attention_heads, 1))

    @property
    def attention_width(self) -> int:
        return self.num_attention_heads * (self.head_dim or self.hidden_size // max(self.num_attention_heads, 1))

    @property
    def known(self) -> bool:
        return self.num_hidden_layers > 0 and self.hidden_size > 0


@dataclass(frozen=True)
class Setup:
    method: str              # full | lora | qlora
    zero_stage: int          # ZeRO stage: 0 (plain DDP) .. 3
    devices: int
    deepspeed: bool
    precision: str           # fp32 | bf16 | fp16
    model_dtype: str         # float32 | bfloat16 | float16 (weights as loaded, without DeepSpeed)
    optimizer: str           # adamw | sgd | adamw_8bit | paged_adamw | paged_adamw_8bit
    offload_optimizer: bool = False
    offload_params: bool = False
    grad_accum_fp32: bool = False  # DeepSpeed JSON data_types.grad_accum_dtype is fp32
    lora_frozen_16bit: bool = False  # plain LoRA in an SFT run under bf16 autocast: frozen linears stored in bf16


@dataclass(frozen=True)
class RLWorkload:
    """What an RL stage holds beside the policy, and its rollout sizes (per device)."""
    rollout_batch: int                # prompts sampled per iteration
    mini_batch: int                   # sequences per PPO update
    prompt_tokens: int                # longest (left-padded) prompt
    response_tokens: int              # sampling.max_new_tokens
    reference_copy: bool              # a frozen copy of the policy (not the adapter-disabled policy)
    reward_model: bool                # the reward is a model (not a function)
    value_model: bool                 # PPO: a value model trains beside the policy
    samples_per_prompt: int = 1       # GRPO: the group
    eval_sequences: int = 0           # the end-of-run comparison: held-out prompts x repeats


@dataclass(frozen=True)
class Workload:
    """What one micro-batch, evaluation and generation hold, per device."""
    batch_size: int                   # rows per micro-batch (train.batch_size)
    seq_len: int                      # tokens per row: data.max_length, or the longest row of the data
    checkpointing: bool = False
    masked: bool = True               # sdpa gets a mask (packed or padded rows): k/v repeated to every head
    loss_chunk_tokens: Optional[int] = None  # None/0: the whole micro-batch's logits at once
    head: str = "causal_lm"           # causal_lm | sequence_classification
    rows_per_example: int = 1         # reward/dpo: chosen and rejected
    eval_batch_size: int = 0          # 0: no evaluation forward
    eval_seq_len: int = 0
    generate_batch: int = 0           # sequences generated at once (eval samples)
    generate_tokens: int = 0          # prompt + max_new_tokens per generated sequence
    device: str = "cpu"
    stage: str = "sft"
    bitsandbytes: bool = False        # the method or optimizer imports bitsandbytes (CPU runtime)
    rl: Optional[RLWorkload] = None


@dataclass
class Estimate:
    params: float = 0.0
    grads: float = 0.0       # 16-bit (or fp32 when training in fp32) gradients held between steps
    grad_accum: float = 0.0  # the fp32 gradient-accumulation buffer (grad_accum_dtype fp32)
    master: float = 0.0
    optimizer: float = 0.0
    fp32_grad_copy: float = 0.0
    gather_buffer: float = 0.0
    host: float = 0.0        # offloaded bytes per device, held in CPU memory
    # what training holds beside the model states (filled when a Workload is given)
    autocast_copies: float = 0.0   # 16-bit copies of fp32 linear weights saved for backward under autocast
                                   # (frozen ones under checkpointing: one block's, recomputed in backward)
    activations: float = 0.0       # saved for backward in the model's layers, one micro-batch
    optimizer_step: float = 0.0    # AdamW's step: a temporary the size of its second moments (foreach sqrt)
    logits: float = 0.0            # the loss's logits, their fp32 copies and gradients
    evaluation: float = 0.0        # eval forward or generation (not at the same time as training)
    rl_models: float = 0.0         # reference copy, reward model, value model (with its gradients and AdamW)
    rollout: float = 0.0           # RL: generation's KV cache, or the scoring forwards' logits (a phase)
    runtime: float = 0.0           # CPU: the process before its model loads (Python, torch, data)
    slack: float = 0.0             # CPU: what glibc keeps resident of a forward's block allocations
    activations_unchecked: float = 0.0  # the activations without gradient checkpointing (the auto rule)
    activations_checked: float = 0.0    # ... and with it
    notes: list = field(default_factory=list)

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.grad_accum + self.master + self.optimizer

    @property
    def device_total(self) -> float:
        """Model states and ZeRO buffers (what the plan counted before activations)."""
        return self.model_states + self.fp32_grad_copy + self.gather_buffer

    @property
    def forward_backward(self) -> float:
        """One micro-batch's forward and backward: activations, logits, autocast copies, the allocator's slack."""
        return self.autocast_copies + self.activations + self.logits + self.slack

    @property
    def training(self) -> float:
        """The larger of a micro-batch's forward and backward and the optimizer step (not at the same time)."""
        return max(self.forward_backward, self.optimizer_step)

    @property
    def transient(self) -> float:
        """The largest phase: training, evaluation, or an RL rollout."""
        return max(self.training, self.evaluation, self.rollout)

    @property
    def peak(self) -> float:
        return self.device_total + self.rl_models + self.transient + self.runtime

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "notes"}
        return {**out, "model_states": self.model_states, "device_total": self.device_total,
                "forward_backward": self.forward_backward, "training": self.training, "peak": self.peak}


def estimate(shape: ModelShape, s: Setup, work: Optional[Workload] = None) -> Estimate:
    e = model_states(shape, s)
    if work is not None and shape.known:
        add_workload(e, shape, s, work)
    return e


def model_states(shape: ModelShape, s: Setup) -> Estimate:
    if s.method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown method {s.method!r}")
    if s.offload_params and s.zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    half = s.precision in ("bf16", "fp16")
    param_bytes = weight_bytes(s)
    trainable = shape.total if s.method == "full" else shape.lora
    if s.method == "full":
        frozen_bytes = 0.0
    elif s.method == "lora" and frozen_linears_16bit(s):  # methods/lora.py store_frozen_linears_16bit
        frozen_bytes = (shape.total - shape.linear) * param_bytes + shape.linear * 2
    elif s.method == "lora":
        frozen_bytes = shape.total * param_bytes
    else:  # qlora: linear weights in NF4; PEFT's prepare_model_for_kbit_training upcasts the rest (embeddings,
        # norms, lm_head) to fp32
        frozen_bytes = shape.linear * NF4_BYTES + (shape.total - shape.linear) * 4

    d = s.devices
    e = Estimate()
    e.params = (frozen_bytes + trainable * param_bytes) / (d if s.zero_stage >= 3 else 1)
    e.grads = trainable * param_bytes / (d if s.zero_stage >= 2 else 1)
    master = 4 * trainable if s.deepspeed else 0
    state_bytes = 4 if (s.deepspeed or param_bytes == 4) else param_bytes
    optim = trainable * {"adamw": 2 * state_bytes, "paged_adamw": 8, "adamw_8bit": 2, "paged_adamw_8bit": 2,
                         "sgd": 0}[s.optimizer]
    shard = d if s.zero_stage >= 1 else 1
    e.master, e.optimizer = master / shard, optim / shard
    if s.optimizer == "adamw" and not s.offload_optimizer:  # torch AdamW (foreach): sqrt(v) as a temporary
        e.optimizer_step = trainable * state_bytes / shard
    if s.deepspeed and half and s.zero_stage >= 1:
        e.fp32_grad_copy = 4 * trainable / shard
        if s.grad_accum_fp32:
            _accumulate_in_fp32(e, trainable, s.zero_stage, d)
    if s.zero_stage == 3:
        e.gather_buffer = 4 * shape.largest_layer
    if s.offload_optimizer:  # ZeRO-Offload keeps gradient partitions in (pinned) host memory too
        e.host += e.grads + e.grad_accum + e.master + e.optimizer + e.fp32_grad_copy
        e.grads = e.grad_accum = e.master = e.optimizer = e.fp32_grad_copy = 0.0
    if s.offload_params:
        e.host += e.params
        e.params = 0.0
    return e


def frozen_linears_16bit(s: Setup) -> bool:
    """LoRA's frozen fp32 linears kept in bf16 (exact under bf16 autocast; not under DeepSpeed)."""
    return s.lora_frozen_16bit and not s.deepspeed and weight_bytes(s) == 4


def weight_bytes(s: Setup) -> int:
    """DeepSpeed trains in 16-bit weights with fp32 masters; without it autocast keeps the loaded dtype."""
    half = s.precision in ("bf16", "fp16")
    return 2 if (s.deepspeed and half) else (2 if s.model_dtype != "float32" else 4)


def compute_bytes(s: Setup) -> int:
    """Bytes of an activation in the matmuls: 16-bit under autocast or with 16-bit weights."""
    return 2 if (s.precision in ("bf16", "fp16") or weight_bytes(s) == 2) else 4


def layer_bytes_per_token(shape: ModelShape, s: Setup, masked: bool = True, lora: bool = False) -> float:
    """What one block saves for backward per token (the module docstring's table)."""
    h, i = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size
    c, stream = compute_bytes(s), weight_bytes(s)
    if shape.encoder:  # q/k/v input, q, k, v, scaled q, context, two LayerNorms' in/out, GELU in/out; 2 masks
        return (9 * h + 2 * i) * c + 2 * h
    kv = shape.attention_width if (masked and shape.kv_width < shape.attention_width) else shape.kv_width
    q = shape.attention_width
    norms = 2 * 4 * h + (2 * 4 * h if stream == 2 else 0)
    total = 2 * stream * h + norms + 2 * c * h + c * (2 * q + 2 * kv) + 4 * c * i
    if lora:
        total += c * shape.lora_r * shape.lora_modules_per_layer
    return total


def attention_matrix_bytes_per_token(shape: ModelShape, seq_len: int) -> float:
    """An encoder with attention dropout: sdpa's math path keeps heads x T scores and probabilities (fp32),
    the dropout mask (1 byte) and the dropped probabilities (fp32) per token."""
    if not shape.encoder or shape.attention_dropout <= 0:
        return 0.0
    return shape.num_attention_heads * seq_len * 13


def activation_bytes(shape: ModelShape, s: Setup, tokens: int, seq_len: int, masked: bool, checkpointing: bool,
                     lora: bool) -> float:
    """Saved for backward in the layers for `tokens` tokens (rows x seq_len), with or without checkpointing."""
    layer = layer_bytes_per_token(shape, s, masked, lora) + attention_matrix_bytes_per_token(shape, seq_len)
    L, stream, h = shape.num_hidden_layers, weight_bytes(s), shape.hidden_size
    final_norm = (stream + 4 + compute_bytes(s)) * h
    if checkpointing:
        return tokens * (L * stream * h + layer + final_norm)
    return tokens * (L * layer + final_norm)


def logit_bytes(s: Setup) -> float:
    """Bytes per logit at the loss's worst moment: LOGIT_FP32_COPIES fp32 copies, plus the 16-bit original."""
    c = compute_bytes(s)
    return 4 * LOGIT_FP32_COPIES + (c if c < 4 else 0)


def logits_bytes(shape: ModelShape, s: Setup, tokens: int, loss_chunk_tokens: Optional[int] = None) -> float:
    """The causal-LM loss over `tokens` tokens, K tokens at a time when chunked (loss_chunk_tokens K > 0)."""
    at_once = min(tokens, loss_chunk_tokens) if loss_chunk_tokens else tokens
    return logit_bytes(s) * at_once * shape.vocab_size


def kv_cache_bytes(shape: ModelShape, s: Setup, sequences: int, tokens: int) -> float:
    return 2 * shape.num_hidden_layers * shape.kv_width * compute_bytes(s) * sequences * tokens


def forward_bytes(shape: ModelShape, s: Setup, tokens: int) -> float:
    """A no-grad forward's largest transient inside one block (MLP intermediates, attention)."""
    h, i = shape.hidden_size, shape.intermediate_size or 4 * shape.hidden_size
    return tokens * (3 * i + 4 * h) * compute_bytes(s)


def model_weight_bytes(shape: ModelShape, s: Setup) -> float:
    return shape.total * weight_bytes(s) / (s.devices if s.zero_stage >= 3 else 1)


def lora_temporaries_per_token(shape: ModelShape, s: Setup) -> float:
    """LoRA's forward allocates, per adapted linear, its up-projection's output and the scaled copy added to the
    base output (out_features wide, freed at once): bytes per token per block."""
    return 2 * compute_bytes(s) * shape.lora_out_per_layer


def add_workload(e: Estimate, shape: ModelShape, s: Setup, w: Workload) -> None:
    lora = s.method in ("lora", "qlora")
    causal = w.head == "causal_lm"
    if s.precision in ("bf16", "fp16") and weight_bytes(s) == 4:  # autocast casts each linear weight once
        # (LoRA's frozen linears already in bf16 are not copied: only the head, tied to an fp32 embedding or not)
        linear = (0 if s.method == "lora" and frozen_linears_16bit(s) else shape.linear) + \
            (shape.lm_head if causal else 0) + \
            (shape.vocab_size * shape.hidden_size if causal and shape.tie_word_embeddings else 0)
        if w.checkpointing and s.method != "full":
            # a frozen weight's cast is not cached (autocast caches only leaves that require grad) and, under
            # checkpointing, not saved for backward either: one block's copies exist at a time
            linear = linear / max(shape.num_hidden_layers, 1)
        e.autocast_copies = 2 * linear / (s.devices if s.zero_stage >= 3 else 1)
    if w.rl is not None:
        tokens = _add_rl(e, shape, s, w, lora)
    else:
        tokens = w.batch_size * w.rows_per_example * w.seq_len
        e.activations_unchecked = activation_bytes(shape, s, tokens, w.seq_len, w.masked, False, lora)
        e.activations_checked = activation_bytes(shape, s, tokens, w.seq_len, w.masked, True, lora)
        e.activations = e.activations_checked if w.checkpointing else e.activations_unchecked
        e.logits = logits_bytes(shape, s, tokens, w.loss_chunk_tokens) if causal else 0.0
        evaluation = 0.0
        if w.eval_batch_size and w.eval_seq_len:
            eval_tokens = w.eval_batch_size * w.rows_per_example * w.eval_seq_len
            evaluation = forward_bytes(shape, s, eval_tokens) + \
                (logits_bytes(shape, s, eval_tokens, w.loss_chunk_tokens) if causal else 0)  # eval's loss is chunked too
        if w.generate_batch and w.generate_tokens:
            evaluation = max(evaluation, kv_cache_bytes(shape, s, w.generate_batch, w.generate_tokens)
                             + logit_bytes(s) * w.generate_batch * w.generate_tokens * shape.vocab_size)
        e.evaluation = float(evaluation)
    if w.device == "cpu":
        e.runtime = RUNTIME_CPU_BYTES.get(w.stage, RUNTIME_CPU_BYTES["sft"]) \
            + (BNB_RUNTIME_BYTES if w.bitsandbytes else 0.0)
        # what a forward allocates through the blocks (whether checkpointing keeps it or not), a share of which
        # glibc keeps resident
        allocated = e.activations_unchecked + (tokens * shape.num_hidden_layers * lora_temporaries_per_token(shape, s)
                                               if lora else 0.0)
        e.slack = ALLOCATOR_SLACK * allocated


def _add_rl(e: Estimate, shape: ModelShape, s: Setup, w: Workload, lora: bool) -> int:
    """PPO / GRPO: the extra models, the update's activations and logits, the rollout and the end-of-run
    comparison as phases; returns the tokens of one update (what the allocator's slack scales with)."""
    rl = w.rl
    weights = model_weight_bytes(shape, s)
    value_states = 4 * weights if rl.value_model else 0.0  # weights + grads + AdamW's two moments (fp32)
    e.rl_models = (weights if rl.reference_copy else 0.0) + (weights if rl.reward_model else 0.0) + value_states
    if rl.value_model:
        e.optimizer_step += weights  # AdamW's sqrt(v) over the value model too
    seq, resp, V, c = rl.prompt_tokens + rl.response_tokens, rl.response_tokens, shape.vocab_size, compute_bytes(s)
    sequences = rl.rollout_batch * rl.samples_per_prompt
    K = w.loss_chunk_tokens  # ftl's PPO applies the head to K response positions at a time (GRPO is TRL's: None)

    def at_once(positions: int) -> int:
        return min(K, positions) if K else positions

    # rollout (no grad): generation's KV cache, then scoring: the policy's (and reference's) logits over every
    # sequence, their fp32 log-softmax over the responses; chunked: only K response positions' logits at a time
    scoring = forward_bytes(shape, s, sequences * seq) + (
        logit_bytes(s) * at_once(sequences * resp) * V if K else c * sequences * seq * V + 8 * sequences * resp * V)
    e.rollout = float(max(kv_cache_bytes(shape, s, sequences, seq), scoring))
    # the update: the policy's (and value model's) activations over mini_batch sequences; the policy's logits
    # and their fp32 copies over the responses (scaled by temperature, log-softmax, entropy)
    tokens = rl.mini_batch * seq
    policy_unchecked = activation_bytes(shape, s, tokens, seq, True, False, lora)
    policy_checked = activation_bytes(shape, s, tokens, seq, True, True, lora)
    value_acts = activation_bytes(shape, s, tokens, seq, True, False, False) if rl.value_model else 0.0
    e.activations_unchecked = policy_unchecked + value_acts
    e.activations_checked = policy_checked + value_acts  # the value model never checkpoints
    e.activations = e.activations_checked if w.checkpointing else e.activations_unchecked
    e.logits = float(16 * at_once(rl.mini_batch * resp) * V if K else c * tokens * V + 16 * rl.mini_batch * resp * V)
    # the end-of-run comparison: both policies sample `eval_sequences` responses; the full logits of one, then both
    # fp32 log-softmaxes and the per-token KL's temporaries (chunked: K positions of both heads at a time)
    n = rl.eval_sequences
    if K:
        e.evaluation = float(max(kv_cache_bytes(shape, s, n, seq), 20 * at_once(n * resp) * V)) if n else 0.0
    else:
        e.evaluation = float(max(c * n * seq * V + 8 * n * resp * V, 20 * n * resp * V)) if n else 0.0
    return tokens


def _accumulate_in_fp32(e: Estimate, trainable: int, zero_stage: int, devices: int) -> None:
    """Gradients accumulate in an fp32 buffer (see the module docstring): it replaces the 16-bit gradient
    partition under stages 2 and 3; stage 1 keeps (zeroes) its full 16-bit gradients beside it."""
    e.grad_accum = 4 * trainable / (devices if zero_stage >= 2 else 1)
    if zero_stage >= 2:
        e.grads = 0.0
    if zero_stage < 3:  # the buffer's partition is the fp32 gradient the optimizer steps on
        e.fp32_grad_copy = 0.0


def zero_paper_bytes(total_params: int, devices: int, zero_stage: int) -> float:
    """The ZeRO paper's per-device model states for mixed-precision Adam (K = 12)."""
    p, g, k = 2.0, 2.0, 12.0
    if zero_stage >= 1:
        k /= devices
    if zero_stage >= 2:
        g /= devices
    if zero_stage >= 3:
        p /= devices
    return (p + g + k) * total_params
