"""Per-device model-state memory by method, precision, optimizer, ZeRO stage and offload.

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
micro-batch. Activations are not model states and are not included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

NF4_BYTES = 0.5 + (1 + 4 / 256) / 64  # 4-bit weights + double-quantised absmax per 64-block


@dataclass(frozen=True)
class ModelShape:
    total: int               # all parameters
    linear: int              # nn.Linear weights a 4-bit quantiser replaces (all but lm_head)
    largest_layer: int       # the largest single module's parameters (ZeRO-3 gathers one at a time)
    lora: int                # LoRA parameters for the recipe's rank and targets


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

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.grad_accum + self.master + self.optimizer

    @property
    def device_total(self) -> float:
        return self.model_states + self.fp32_grad_copy + self.gather_buffer

    def as_dict(self) -> dict:
        return {**asdict(self), "model_states": self.model_states, "device_total": self.device_total}


def estimate(shape: ModelShape, s: Setup) -> Estimate:
    if s.method not in ("full", "lora", "qlora"):
        raise ValueError(f"unknown method {s.method!r}")
    if s.offload_params and s.zero_stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    half = s.precision in ("bf16", "fp16")
    # DeepSpeed trains in 16-bit weights with fp32 masters; without it autocast keeps the loaded dtype.
    param_bytes = 2 if (s.deepspeed and half) else (2 if s.model_dtype != "float32" else 4)
    trainable = shape.total if s.method == "full" else shape.lora
    if s.method == "full":
        frozen_bytes = 0.0
    elif s.method == "lora":
        frozen_bytes = shape.total * param_bytes
    else:  # qlora: linear weights in NF4, the rest (embeddings, norms, lm_head) in the compute dtype
        frozen_bytes = shape.linear * NF4_BYTES + (shape.total - shape.linear) * min(param_bytes, 2)

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
