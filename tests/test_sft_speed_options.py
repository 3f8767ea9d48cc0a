"""Speed options of the shared loop: train.optimizer_impl (fused AdamW by default) and train.compile.

The fused optimizer must give the reference AdamW's parameters (float rounding apart) and load its state;
train.compile must reach the model's blocks, be recorded in the manifest, and be fixed for a run (a resume
that changes it is refused). Whether compiled losses equal eager ones is checked in bench/sft_throughput.py
(compiling on CPU takes longer than a test may)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import RECIPES, tiny_recipe_dict, write_recipe
from ftl.config.load import load_recipe
from ftl.config.schema import TrainConfig
from ftl.errors import RecipeError
from ftl.train.controls import check_loop_controls
from ftl.train.loop import build_optimizer, optimizer_impl


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 32), torch.nn.GELU(),
                               torch.nn.Linear(32, 50))


def _train(model, optimizer, steps: int, first: int = 0) -> None:
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, 50, (4, 8), generator=g)
        loss = torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(1, 1).flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_fused_optimizer_gives_the_reference_parameters(kind):
    cfg = dict(optimizer=kind, lr=1e-2, weight_decay=0.1)
    reference, fused = _model(), _model()
    ref_opt = build_optimizer(reference, TrainConfig(**cfg, optimizer_impl="for_loop"))
    fused_opt = build_optimizer(fused, TrainConfig(**cfg))  # auto
    assert fused_opt.defaults["fused"] is True and not ref_opt.defaults.get("fused")
    _train(reference, ref_opt, 20)
    _train(fused, fused_opt, 20)
    for (name, a), b in zip(reference.named_parameters(), fused.parameters()):
        assert not torch.equal(a, _model().state_dict()[name])  # it trained
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fused_adamw_continues_from_the_reference_state():
    """A checkpoint of a single-tensor AdamW loads into the fused one (state layout is shared)."""
    straight, resumed = _model(), _model()
    straight_opt = build_optimizer(straight, TrainConfig(lr=1e-2, optimizer_impl="for_loop"))
    _train(straight, straight_opt, 10)
    resumed.load_state_dict(straight.state_dict())
    resumed_opt = build_optimizer(resumed, TrainConfig(lr=1e-2, optimizer_impl="fused"))
    resumed_opt.load_state_dict(copy.deepcopy(straight_opt.state_dict()))
    _train(straight, straight_opt, 10, first=10)
    _train(resumed, resumed_opt, 10, first=10)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_optimizer_impl_resolution():
    params = list(_model().parameters())
    assert optimizer_impl(TrainConfig(), params) == "fused"
    assert optimizer_impl(TrainConfig(), params, deepspeed=True) == "torch default"
    assert optimizer_impl(TrainConfig(optimizer_impl="foreach"), params) == "foreach"
    opt = build_optimizer(_model(), TrainConfig(optimizer_impl="foreach"))
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    assert optimizer_impl(TrainConfig(optimizer="adamw_8bit"), params) == "n/a"
    with pytest.raises(RecipeError, match="train.optimizer_impl"):
        optimizer_impl(TrainConfig(optimizer="adamw_8bit", optimizer_impl="fused"), params)


@pytest.mark.parametrize("key", ["train.compile=true", "train.optimizer_impl=fused"])
def test_speed_options_refused_where_the_shared_loop_does_not_train(key):
    recipe = load_recipe(RECIPES / "rlhf" / "ppo.yaml", "tiny", [key])
    with pytest.raises(RecipeError, match=key.split("=")[0]):
        check_loop_controls(recipe)


def test_compile_reaches_every_block_is_recorded_and_fixed_on_resume(tmp_path, monkeypatch):
    """train.compile: true compiles each decoder block (the compile itself replaced by a recorder here), the
    manifest says so, and --resume refuses to switch it; optimizer_impl may change on resume."""
    from ftl.runner import run_recipe

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    run = tmp_path / "run"
    recipe = tiny_recipe_dict(run, train={"max_steps": 4, "save_every": 2, "compile": True},
                              eval={"max_examples": 4, "generate": {"from_validation": 0}}, track={"plot": False})
    path = write_recipe(tmp_path / "recipe.yaml", recipe)
    run_recipe(path)
    assert compiled == ["LlamaDecoderLayer"] * 2
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["compile"] == {"enabled": True, "blocks": 2, "block_path": "model.layers",
                                   "backend": "inductor", "torch": torch.__version__}
    assert manifest["optimizer_builds"][0]["implementation"] == "fused"

    recipe["train"]["compile"] = False
    write_recipe(path, recipe)
    with pytest.raises(RecipeError, match=r"train\.compile: True → False"):
        run_recipe(path, resume=True)

    recipe["train"].update({"compile": True, "max_steps": 6, "optimizer_impl": "for_loop"})
    write_recipe(path, recipe)
    run_recipe(path, resume=True)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["optimizer_builds"][-1]["implementation"] == "for_loop"
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses if "loss" in r][-2:] == [5, 6]
