"""Per-device model-state memory by method, precision, optimizer, ZeRO stage and offload.

The ZeRO paper's accounting (Rajbhandari et al. 2020): mixed-precision Adam holds 2 bytes of 16-bit
parameters, 2 of 16-bit gradients and 12 of fp32 master weights + momentum + variance per parameter
(16 bytes); stage 1 partitions the 12, stage 2 also the gradients, stage 3 also the parameters.
DeepSpeed additionally keeps an fp32 copy of each gradient partition while stepping (its estimator's
18 bytes) and gathers one layer at a time under stage 3; both are counted here as separate terms.
Activations are not model states and are not included.
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


@dataclass
class Estimate:
    params: float = 0.0
    grads: float = 0.0
    master: float = 0.0
    optimizer: float = 0.0
    fp32_grad_copy: float = 0.0
    gather_buffer: float = 0.0
    host: float = 0.0        # offloaded bytes per device, held in CPU memory

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.master + self.optimizer

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
    if s.zero_stage == 3:
        e.gather_buffer = 4 * shape.largest_layer
    if s.offload_optimizer:  # ZeRO-Offload keeps gradient partitions in (pinned) host memory too
        e.host += e.grads + e.master + e.optimizer + e.fp32_grad_copy
        e.grads = e.master = e.optimizer = e.fp32_grad_copy = 0.0
    if s.offload_params:
        e.host += e.params
        e.params = 0.0
    return e


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
