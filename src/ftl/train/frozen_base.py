"""Checkpoints that leave the frozen base out: adapter methods (LoRA, DoRA, QLoRA, IA3, prefix/prompt tuning,
bottleneck adapters), a head-only classifier, train.freeze.

The rule. When training is set up (the method applied, train.freeze applied, before the first optimizer),
every parameter with requires_grad False is *frozen for the whole run*: gradual unfreezing only chooses
within what is trainable at set-up (a block a later phase opens is trainable at set-up, so it is saved from
the first checkpoint on), no optimizer ever holds a frozen parameter, and nothing else writes one. So at
every checkpoint a frozen parameter still holds what building the model produced, and a resume, which builds
the model the same way (same base folder, method and seed) before loading the checkpoint, recreates it.
A checkpoint therefore leaves out exactly these parameters, and the state a module keeps for them when all of
its own parameters are frozen (bitsandbytes' 4-bit absmax/quant map, 8-bit SCB); it keeps every other
parameter, every registered buffer, and accelerate's optimizer, scheduler, RNG and sampler states as before.

The rebuild is checked, not trusted: each checkpoint records a SHA-256 digest of every left-out parameter
(`frozen_digests.json`), and a resume whose rebuilt model differs (a base folder replaced since the run
started, a frozen tensor drawn from another random state) is refused, naming the tensors, instead of
training on another model.

Nothing frozen (full fine-tuning) leaves nothing out: accelerate saves and loads exactly as without this
module. DeepSpeed writes its own checkpoint format (one file per rank's shards) and is left alone.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from pathlib import Path

import torch

from ftl.errors import RecipeError

DIGEST_FILE = "frozen_digests.json"


def leave_frozen_base_out(accelerator, models: list[torch.nn.Module]) -> "FrozenBase | None":
    """Call once training is set up (method and train.freeze applied, before any unfreeze phase narrows what
    trains): checkpoints of `accelerator` then leave out the parameters of `models` frozen now."""
    from accelerate.utils import DistributedType

    previous = getattr(accelerator, "_ftl_frozen_base", None)
    if previous is not None:  # a second fit on the same accelerator: the latest set-up decides
        previous.remove()
        accelerator._ftl_frozen_base = None
    if accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP,
                                        DistributedType.MEGATRON_LM):
        return None  # these write their own checkpoint formats; left exactly as they were
    frozen = {id(p): p for m in models for p in m.parameters() if not p.requires_grad}
    if not frozen:
        return None
    accelerator._ftl_frozen_base = FrozenBase(accelerator, frozen)
    return accelerator._ftl_frozen_base


class FrozenBase:
    """accelerate's save/load hooks that write and read a model file without the frozen parameters."""

    def __init__(self, accelerator, frozen: dict[int, torch.nn.Parameter]):
        self.accelerator = accelerator
        self.frozen = frozen  # id → parameter (kept alive, so the ids stay theirs)
        self.handles = [accelerator.register_save_state_pre_hook(self._before_save),
                        accelerator.register_load_state_pre_hook(self._before_load)]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    # -- what is left out ------------------------------------------------------------------------
    def left_out(self, model: torch.nn.Module, keys) -> set[str]:
        """The state-dict keys of `model` (as named by `keys`) a checkpoint leaves out."""
        params = dict(model.named_parameters(remove_duplicate=False))  # tied weights: every name
        buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
        out = set()
        for key in keys:
            if key in params:
                if id(params[key]) in self.frozen:
                    out.add(key)
            elif key not in buffers and self._wholly_frozen(_owner(model, key)):
                out.add(key)  # a frozen module's own extra state: bitsandbytes' quantisation state
        return out

    def _wholly_frozen(self, module: torch.nn.Module) -> bool:
        own = list(module.parameters(recurse=False))
        return bool(own) and all(id(p) in self.frozen for p in own)

    def digests(self, model: torch.nn.Module) -> dict[str, str]:
        """SHA-256 (first 16 hex digits) of each frozen parameter's bytes, by its unwrapped name."""
        unwrapped = self.accelerator.unwrap_model(model)
        return {name: _digest(p) for name, p in unwrapped.named_parameters() if id(p) in self.frozen}

    # -- accelerate's hooks ----------------------------------------------------------------------
    def _before_save(self, models, weights, output_dir) -> None:
        """Drop the frozen parameters from each model's state dict before accelerate writes it, and record
        their digests beside it."""
        digests = {}
        for i, model in enumerate(models):
            out = self.left_out(model, weights[i].keys())
            weights[i] = OrderedDict((k, v) for k, v in weights[i].items() if k not in out)
            if self.accelerator.is_main_process:
                digests[_model_file(i)] = self.digests(model)
        if self.accelerator.is_main_process:
            Path(output_dir, DIGEST_FILE).write_text(json.dumps(digests, indent=1, sort_keys=True))

    def _before_load(self, models, input_dir) -> None:
        """Check the rebuilt frozen parameters against the checkpoint's digests, then load each model file
        over the model; accelerate's own load (strict: every key present) is skipped by emptying `models`."""
        from safetensors.torch import load_file

        folder = Path(input_dir)
        recorded = _read_digests(folder)
        for i, model in enumerate(models):
            if recorded is not None:  # a checkpoint written before frozen parameters were left out has none
                _check_digests(folder, _model_file(i), recorded.get(_model_file(i), {}), self.digests(model))
            saved = load_file(str(folder / _model_file(i)))
            result = model.load_state_dict(saved, strict=False)
            missing = set(result.missing_keys) - self.left_out(model, result.missing_keys)
            if result.unexpected_keys or missing:
                raise RecipeError(f"--resume: {folder / _model_file(i)} does not fit the model this recipe builds "
                                  f"(missing trained tensors: {sorted(missing)[:3]}, unexpected: "
                                  f"{sorted(result.unexpected_keys)[:3]}); resume with the recipe that wrote it, "
                                  "or start afresh with --overwrite")
        models.clear()


def _owner(model: torch.nn.Module, key: str) -> torch.nn.Module:
    """The module whose own state-dict entry `key` is (the deepest module its dotted prefix names)."""
    module = model
    for part in key.split(".")[:-1]:
        child = dict(module.named_children()).get(part)
        if child is None:
            break
        module = child
    return module


def _digest(param: torch.Tensor) -> str:
    raw = param.data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype, packed 4-bit too
    return hashlib.sha256(memoryview(raw)).hexdigest()[:16]


def _model_file(index: int) -> str:
    """accelerate's name for the index-th prepared model's weights (safetensors, its default)."""
    return "model.safetensors" if index == 0 else f"model_{index}.safetensors"


def _read_digests(folder: Path):
    path = folder / DIGEST_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _check_digests(folder: Path, file: str, recorded: dict, rebuilt: dict) -> None:
    differ = sorted(name for name in set(recorded) | set(rebuilt) if recorded.get(name) != rebuilt.get(name))
    if differ:
        raise RecipeError(f"--resume: {folder} holds only the trained tensors of {file} and relies on the rebuilt "
                          f"model for the frozen ones, but {len(differ)} frozen tensor(s) of the model this "
                          f"recipe builds differ from the run's ({', '.join(differ[:3])}"
                          f"{', ...' if len(differ) > 3 else ''}): the base model changed since the run started "
                          "(a replaced model folder?) or a frozen tensor was initialised from another random "
                          "state. Resume with the original base, or start afresh with --overwrite")
