"""Classical fine-tuning controls: freezing, layer-wise learning rates, gradual unfreezing, early stopping.

A model is seen as three parts, found by name so PEFT-wrapped models work too:
- embeddings: the input embedding module (and its `*embeddings` parent, e.g. BERT's position and
  token-type embeddings and their LayerNorm);
- blocks: the transformer blocks, the longest ModuleList named `layers` / `layer` / `h` / `blocks`
  (Llama `model.layers.N`, BERT `encoder.layer.N`, GPT-2 `transformer.h.N`), numbered from the input;
- head: everything else (lm_head, score, classifier, pooler, the final norm, PEFT prompt encoders).
  A matrix shared by the input embeddings and the output layer (tied lm_head) counts as head, and
  `freeze.embeddings` freezes it too.

Controls only ever narrow what the method trains: a parameter trains when the method leaves it
trainable, no freeze rule matches it, and (with gradual unfreezing) the current unfreeze phase includes
it. A *phase* is one entry of `train.unfreeze` (a span of optimizer steps); "stage" always means the
recipe's stage (sft, reward, ppo, ...).
"""

from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ftl.config.schema import EarlyStoppingConfig, FreezeConfig, TrainConfig
from ftl.config.stages import STAGES
from ftl.errors import RecipeError
from ftl.methods import count

BLOCK_LISTS = ("layers", "layer", "h", "blocks")
PEFT_PREFIXES = (re.compile(r"^base_model\.model\."), re.compile(r"^base_model\."))  # LoRA-style, prompt-learning


# -- the model's parts ---------------------------------------------------------------------------
@dataclass
class Layout:
    names: list[str]                     # every parameter, named_parameters() order
    blocks: list[list[str]]              # block i (0 = nearest the input) → its parameter names
    embeddings: set[str]
    tied: set[str]                       # embedding matrices that are also the output layer
    block_path: Optional[str] = None     # e.g. "model.layers"
    _block_of: dict[str, int] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def part(self, name: str) -> str:
        """'block', 'embeddings' or 'head' (a tied embedding/output matrix is head)."""
        if name in self._block_of:
            return "block"
        if name in self.embeddings and name not in self.tied:
            return "embeddings"
        return "head"

    def block_of(self, name: str) -> Optional[int]:
        return self._block_of.get(name)

    def summary(self) -> dict:
        return {"blocks": self.num_blocks, "block_path": self.block_path,
                "embeddings": sorted(self.embeddings), "tied_head": sorted(self.tied),
                "head": [n for n in self.names if self.part(n) == "head"]}


def model_layout(model: nn.Module) -> Layout:
    names = [n for n, _ in model.named_parameters()]
    by_id = {id(p): n for n, p in model.named_parameters()}

    block_path, container = None, None
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and path.rsplit(".", 1)[-1] in BLOCK_LISTS and len(module) > 0:
            if container is None or len(module) > len(container):
                block_path, container = path, module
    blocks: list[list[str]] = []
    block_of: dict[str, int] = {}
    if container is not None:
        for i, block in enumerate(container):
            members = [by_id[id(p)] for p in block.parameters() if id(p) in by_id]
            blocks.append(members)
            block_of.update({n: i for n in members})

    embeddings: set[str] = set()
    modules = dict(model.named_modules())
    inputs = _input_embeddings(model)
    if inputs is not None:
        path = next((k for k, m in modules.items() if m is inputs), None)
        parent = path.rsplit(".", 1)[0] if path and "." in path else None
        scope = modules[parent] if parent and parent.rsplit(".", 1)[-1].endswith("embeddings") else inputs
        embeddings = {by_id[id(p)] for p in scope.parameters() if id(p) in by_id}
    for path, module in modules.items():  # absolute position embeddings kept outside an *embeddings module
        if isinstance(module, nn.Embedding) and re.search(r"(^|\.)(wpe|embed_positions|position_embeddings)$", path):
            embeddings |= {by_id[id(p)] for p in module.parameters() if id(p) in by_id}
    embeddings -= set(block_of)

    tied: set[str] = set()
    outputs = _output_embeddings(model)
    if outputs is not None and getattr(outputs, "weight", None) is not None and id(outputs.weight) in by_id:
        name = by_id[id(outputs.weight)]
        if name in embeddings:
            tied.add(name)
    return Layout(names, blocks, embeddings, tied, block_path, block_of)


def _input_embeddings(model):
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _output_embeddings(model):
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


# -- freezing ------------------------------------------------------------------------------------
def freeze_active(cfg: FreezeConfig) -> bool:
    return cfg.embeddings or cfg.bottom_layers > 0 or bool(cfg.modules)


def frozen_names(layout: Layout, cfg: FreezeConfig) -> set[str]:
    """Parameter names the recipe's `train.freeze` freezes (errors name the key)."""
    frozen: set[str] = set()
    if cfg.embeddings:
        if not layout.embeddings:
            raise RecipeError("train.freeze.embeddings: found no input embeddings in this model")
        frozen |= layout.embeddings
    if cfg.bottom_layers:
        _need_blocks(layout, "train.freeze.bottom_layers")
        if cfg.bottom_layers > layout.num_blocks:
            raise RecipeError(f"train.freeze.bottom_layers={cfg.bottom_layers} but the model has "
                              f"{layout.num_blocks} transformer blocks ({layout.block_path}.0-{layout.num_blocks - 1})")
        for block in layout.blocks[: cfg.bottom_layers]:
            frozen |= set(block)
    for pattern in cfg.modules:
        matched = {n for n in layout.names if _matches(n, pattern)}
        if not matched:
            raise RecipeError(f"train.freeze.modules: '{pattern}' matches no parameter (names look like "
                              f"'{layout.names[0]}', '{layout.names[-1]}')")
        frozen |= matched
    return frozen


def _matches(name: str, pattern: str) -> bool:
    forms = [name] + [prefix.sub("", name, count=1) for prefix in PEFT_PREFIXES]
    return any(fnmatch.fnmatchcase(n, p) for n in forms for p in (pattern, pattern + ".*"))


def apply_freeze(model: nn.Module, cfg: FreezeConfig, layout: Optional[Layout] = None) -> set[str]:
    """Freeze what `train.freeze` names (on top of the method); returns the names it froze."""
    if not freeze_active(cfg):
        return set()
    layout = layout or model_layout(model)
    frozen = frozen_names(layout, cfg)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError("train.freeze leaves no parameter to train")
    return frozen


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _need_blocks(layout: Layout, key: str) -> None:
    if not layout.blocks:
        raise RecipeError(f"{key}: found no transformer blocks in this model (looked for a module list named "
                          f"{', '.join(BLOCK_LISTS)}, e.g. model.layers.N or encoder.layer.N)")


# -- gradual unfreezing: phases ------------------------------------------------------------------
@dataclass
class Phase:
    index: int
    start: int                 # optimizer steps before this phase
    end: int                   # last optimizer step of this phase (inclusive)
    lr: float
    top_blocks: Optional[int]  # None: everything the method and freeze allow ('all', or no schedule)

    @property
    def steps(self) -> int:
        return self.end - self.start


def micro_batches_per_epoch(n_examples: int, batch_size: int, world: int) -> int:
    return max(1, n_examples // (batch_size * world))


def epochs_to_steps(epochs: float, cfg: TrainConfig, n_examples: int, world: int) -> int:
    return max(1, math.ceil(epochs * micro_batches_per_epoch(n_examples, cfg.batch_size, world) / cfg.grad_accum))


def plan_phases(cfg: TrainConfig, n_examples: int, world: int, num_blocks: Optional[int] = None) -> list[Phase]:
    """The unfreeze schedule in optimizer steps; without one, a single phase of the whole run."""
    if not cfg.unfreeze:
        total = cfg.max_steps or epochs_to_steps(cfg.epochs, cfg, n_examples, world)
        return [Phase(0, 0, total, cfg.lr, None)]
    phases, start = [], 0
    for i, spec in enumerate(cfg.unfreeze):
        steps = spec.steps or epochs_to_steps(spec.epochs, cfg, n_examples, world)
        top = None if spec.top_blocks == "all" else spec.top_blocks
        if top is not None and num_blocks is not None:
            if top > num_blocks:
                raise RecipeError(f"train.unfreeze[{i}].top_blocks={top} but the model has {num_blocks} "
                                  "transformer blocks")
        phases.append(Phase(i, start, start + steps, spec.lr, top))
        start += steps
    return phases


def phase_of_step(phases: list[Phase], step: int) -> int:
    """The phase that ran optimizer step `step` (1-based); step 0 → the first phase."""
    for phase in phases:
        if step <= phase.end:
            return phase.index
    return phases[-1].index


def phase_for_next_step(phases: list[Phase], done: int) -> int:
    """The phase that runs the step after `done` completed steps."""
    return phase_of_step(phases, done + 1)


def phase_trainable(layout: Layout, allowed: set[str], phase: Phase) -> set[str]:
    """What trains in a phase: the head plus the top `top_blocks` blocks, within what `allowed` permits."""
    if phase.top_blocks is None:
        return set(allowed)
    blocks = set()
    for block in layout.blocks[layout.num_blocks - phase.top_blocks:] if phase.top_blocks else []:
        blocks |= set(block)
    return {n for n in allowed if n in blocks or layout.part(n) == "head"}


# -- layer-wise learning rates ---------------------------------------------------------------------
@dataclass
class Group:
    name: str
    lr: float
    names: list[str]


def layer_lr_active(cfg: TrainConfig) -> bool:
    return cfg.layer_lr.decay is not None or cfg.layer_lr.head_lr is not None


def param_groups(layout: Layout, trainable: set[str], lr: float, cfg: TrainConfig) -> list[Group]:
    """One group per block (top block at `lr`, block d below it at lr * decay**d), the embeddings
    below the bottom block (lr * decay**num_blocks) and the head (head_lr, default lr). Empty groups
    are left out; the first group carries the base rate `lr` whenever it trains."""
    ordered = [n for n in layout.names if n in trainable]
    head_lr = cfg.layer_lr.head_lr or lr
    if not layer_lr_active(cfg):
        return [Group("trainable", lr, ordered)]
    if cfg.layer_lr.decay is None:  # head rate only
        body = [n for n in ordered if layout.part(n) != "head"]
        groups = [Group("body", lr, body), Group("head", head_lr, [n for n in ordered if layout.part(n) == "head"])]
        return [g for g in groups if g.names]
    _need_blocks(layout, "train.layer_lr.decay")
    decay, top = cfg.layer_lr.decay, layout.num_blocks - 1
    groups = [Group(f"block.{i}", lr * decay ** (top - i), [n for n in ordered if layout.block_of(n) == i])
              for i in range(top, -1, -1)]
    groups.append(Group("embeddings", lr * decay ** layout.num_blocks,
                        [n for n in ordered if layout.part(n) == "embeddings"]))
    groups.append(Group("head", head_lr, [n for n in ordered if layout.part(n) == "head"]))
    return [g for g in groups if g.names]


def check_settings(cfg: TrainConfig, caller_groups: bool) -> None:
    if cfg.unfreeze and cfg.layer_lr.head_lr is not None:
        raise RecipeError("train.layer_lr.head_lr cannot be combined with train.unfreeze: each phase's lr "
                          "(train.unfreeze[i].lr) is the head's rate; use train.layer_lr.decay for the blocks")
    if caller_groups and (cfg.unfreeze or layer_lr_active(cfg)):
        raise RecipeError("this stage sets its own optimizer parameter groups: train.layer_lr and "
                          "train.unfreeze are not available here")


def describe_groups(groups: list[Group], params: dict) -> list[dict]:
    return [{"name": g.name, "lr": g.lr, "tensors": len(g.names),
             "params": sum(count(params[n]) for n in g.names), "names": g.names} for g in groups]


def groups_line(described: list[dict]) -> str:
    shown = described if len(described) <= 6 else described[:5] + [{"name": "...", "tensors": "", "lr": None}]
    return " | ".join(f"{g['name']} {g['tensors']} tensors lr {g['lr']:.3g}" if g["lr"] is not None else "..."
                      for g in shown)


# -- early stopping -------------------------------------------------------------------------------
class EarlyStopping:
    """Tracks the best validation value; `update` returns True when an epoch improves on it."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.best_step: Optional[int] = None
        self.bad_epochs = 0
        self.stopped = False
        self.history: list[dict] = []

    @property
    def enabled(self) -> bool:
        return self.cfg.metric is not None

    def value_from(self, metrics: dict) -> float:
        key = self.cfg.metric
        if not metrics:
            raise RecipeError(f"train.early_stopping.metric='{key}': the stage has no validation examples to "
                              "evaluate (set data.split.validation above 0)")
        if key not in metrics or not isinstance(metrics[key], (int, float)):
            known = ", ".join(k for k, v in metrics.items() if isinstance(v, (int, float)))
            raise RecipeError(f"train.early_stopping.metric='{key}' is not a validation metric of this stage "
                              f"(it reports: {known})")
        return float(metrics[key])

    def improves(self, value: float) -> bool:
        if self.best is None:
            return True
        if self.cfg.mode == "min":
            return value < self.best - self.cfg.min_delta
        return value > self.best + self.cfg.min_delta

    def update(self, value: float, epoch: int, step: int) -> bool:
        better = self.improves(value)
        if better:
            self.best, self.best_epoch, self.best_step, self.bad_epochs = value, epoch, step, 0
        else:
            self.bad_epochs += 1
            self.stopped = self.bad_epochs >= self.cfg.patience
        self.history.append({"epoch": epoch, "step": step, "value": value, "improved": better})
        return better

    def state(self) -> dict:
        return {"metric": self.cfg.metric, "mode": self.cfg.mode, "patience": self.cfg.patience,
                "min_delta": self.cfg.min_delta, "best_value": self.best, "best_epoch": self.best_epoch,
                "best_step": self.best_step, "bad_epochs": self.bad_epochs, "stopped_early": self.stopped,
                "history": self.history}

    def restore(self, state: Optional[dict]) -> None:
        if not state:
            return
        self.best, self.best_epoch, self.best_step = state["best_value"], state["best_epoch"], state["best_step"]
        self.bad_epochs, self.stopped = state["bad_epochs"], state["stopped_early"]
        self.history = list(state.get("history", []))


def check_loop_controls(recipe) -> None:
    """Layer-wise rates, gradual unfreezing and early stopping live in the shared loop: refuse them
    (rather than ignore them) in stages that train elsewhere (STAGES[...].own_loop: PPO's loop, TRL's
    trainers). train.freeze works in every stage."""
    if not STAGES[recipe.stage].own_loop:
        return
    t = recipe.train
    for key, used in (("train.layer_lr", layer_lr_active(t)), ("train.unfreeze", bool(t.unfreeze)),
                      ("train.early_stopping.metric", t.early_stopping.metric is not None),
                      ("train.compile", t.compile), ("train.optimizer_impl", t.optimizer_impl != "auto")):
        if used:
            raise RecipeError(f"{key} is not available in stage '{recipe.stage}' (it trains outside ftl's shared "
                              "loop); use it with sft, reward, classify or upft")
