"""Classical controls: freezing, layer-wise learning rates, staged unfreezing (with resume across a stage
boundary) and early stopping with a best/ copy. In-process fits on a 3-block tiny Llama, plus two real
`ftl run`s for the recipe → manifest → run-directory path."""

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import read_jsonl, run_ftl, tiny_recipe_dict, write_recipe
from ftl.config.schema import DataConfig, LaunchConfig, ModelConfig, Recipe, TrainConfig
from ftl.data import load_splits
from ftl.data.packing import collate, pack_sequences
from ftl.data.tokenize import encode_records
from ftl.errors import RecipeError
from ftl.evaluate.lm import causal_lm_loss, lm_loss
from ftl.models.load import base_model_dir, load_model, record_texts
from ftl.models.tiny import train_tiny_tokenizer
from ftl.train import controls
from ftl.train.distributed import make_accelerator
from ftl.train.loop import fit

TINY3 = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 400}


# -- in-process fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("controls")
    data = DataConfig.model_validate({**tiny_recipe_dict(tmp)["data"], "limit": 200})
    splits = load_splits(data)[0]
    tokenizer = train_tiny_tokenizer(record_texts(splits.train), 400)
    model_cfg = ModelConfig(source="tiny", tiny=TINY3)
    base = base_model_dir(model_cfg, tokenizer, 0, tmp)
    rows = pack_sequences(encode_records(tokenizer, splits.train, data), 96)
    validation = encode_records(tokenizer, splits.validation[:8], data)
    return {"tmp": tmp, "model_cfg": model_cfg, "base": base, "rows": rows, "validation": validation,
            "pad": tokenizer.pad_token_id}


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def train(setup, run_dir, cfg: TrainConfig, resume=False, on_step=None, evaluate=None, method=None):
    """One in-process fit from the saved base; on_step(record, model) runs after every logged step."""
    model = load_model(setup["model_cfg"], setup["base"])
    if method is not None:
        from ftl.methods import apply_method
        model = apply_method(model, method)
    history = []

    def log(record):
        history.append(record)
        if on_step and "loss" in record:
            on_step(record, model)

    accelerator = make_accelerator(cfg, LaunchConfig())
    fitted, result = fit(accelerator=accelerator, model=model, cfg=cfg, features=setup["rows"],
                         collate=lambda rs: collate(rs, setup["pad"]), loss_fn=causal_lm_loss, run_dir=run_dir,
                         log=log, resume=resume, evaluate=evaluate, progress=False)
    return accelerator.unwrap_model(fitted), result, history


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def blocks_of(names, i):
    return [n for n in names if n.startswith(f"model.layers.{i}.")]


# -- layout and settings ------------------------------------------------------------------------
def test_layout_finds_blocks_embeddings_and_head_in_llama_bert_peft_and_tied_models():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification, LlamaConfig

    def llama(**kw):
        return AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                            num_attention_heads=4, num_key_value_heads=2,
                                                            vocab_size=100, **kw))

    layout = controls.model_layout(llama(tie_word_embeddings=False))
    assert layout.num_blocks == 3 and layout.block_path == "model.layers"
    assert layout.embeddings == {"model.embed_tokens.weight"}
    assert [n for n in layout.names if layout.part(n) == "head"] == ["model.norm.weight", "lm_head.weight"]
    assert blocks_of(layout.names, 2) == layout.blocks[2]

    tied = controls.model_layout(llama(tie_word_embeddings=True))  # lm_head shares the embedding matrix
    assert tied.tied == {"model.embed_tokens.weight"} and tied.part("model.embed_tokens.weight") == "head"

    bert = controls.model_layout(BertForSequenceClassification(BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
        num_labels=3)))
    assert bert.num_blocks == 2 and bert.block_path == "bert.encoder.layer"
    assert "bert.embeddings.position_embeddings.weight" in bert.embeddings
    assert "bert.embeddings.LayerNorm.weight" in bert.embeddings
    assert {n for n in bert.names if bert.part(n) == "head"} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"}

    peft = get_peft_model(llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layout = controls.model_layout(peft)
    assert layout.num_blocks == 3 and layout.block_path == "base_model.model.model.layers"
    lora = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert lora and all(layout.part(n) == "block" for n in lora)
    # freeze patterns are written without PEFT's prefix
    frozen = controls.apply_freeze(peft, TrainConfig(freeze={"modules": ["model.layers.0"]}).freeze, layout)
    assert frozen == set(layout.blocks[0])
    assert not any(p.requires_grad for n, p in peft.named_parameters() if n in frozen)  # PEFT base stays frozen
    assert all(p.requires_grad for n, p in peft.named_parameters() if n in lora and n not in frozen)


def test_param_groups_decay_from_the_top_block_and_the_head_has_its_own_rate():
    from transformers import AutoModelForCausalLM, LlamaConfig

    model = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=100))
    layout = controls.model_layout(model)
    cfg = TrainConfig(lr=1e-3, layer_lr={"decay": 0.5, "head_lr": 3e-3})
    groups = controls.param_groups(layout, set(layout.names), cfg.lr, cfg)
    assert [(g.name, g.lr) for g in groups] == [("block.2", 1e-3), ("block.1", 5e-4), ("block.0", 2.5e-4),
                                                ("embeddings", 1.25e-4), ("head", 3e-3)]
    assert groups[0].names == layout.blocks[2] and groups[-1].names == ["model.norm.weight", "lm_head.weight"]
    assert sorted(n for g in groups for n in g.names) == sorted(layout.names)  # each parameter exactly once
    # frozen parameters are left out; groups left empty disappear
    trainable = set(layout.names) - set(layout.blocks[0]) - layout.embeddings
    assert [g.name for g in controls.param_groups(layout, trainable, cfg.lr, cfg)] == ["block.2", "block.1", "head"]


def test_bad_settings_name_the_key(setup, tmp_path):
    layout = controls.model_layout(load_model(setup["model_cfg"], setup["base"]))
    with pytest.raises(RecipeError, match=r"train\.freeze\.bottom_layers=5 but the model has 3 transformer blocks"):
        controls.frozen_names(layout, TrainConfig(freeze={"bottom_layers": 5}).freeze)
    with pytest.raises(RecipeError, match=r"train\.freeze\.modules: 'decoder\.\*' matches no parameter"):
        controls.frozen_names(layout, TrainConfig(freeze={"modules": ["decoder.*"]}).freeze)
    stages = TrainConfig(unfreeze=[{"steps": 2, "lr": 1e-3}, {"steps": 2, "lr": 1e-4, "top_blocks": 4}])
    with pytest.raises(RecipeError, match=r"train\.unfreeze\[1\]\.top_blocks=4 but the model has 3"):
        train(setup, tmp_path / "a", stages)
    with pytest.raises(RecipeError, match=r"train\.layer_lr\.head_lr cannot be combined with train\.unfreeze"):
        train(setup, tmp_path / "b", TrainConfig(unfreeze=[{"steps": 2, "lr": 1e-3}], layer_lr={"head_lr": 1e-2}))
    # LoRA trains nothing outside the blocks: a head-only stage would train nothing
    from ftl.config.schema import MethodConfig
    with pytest.raises(RecipeError, match=r"train\.unfreeze\[0\]: nothing trains in this phase"):
        train(setup, tmp_path / "c", TrainConfig(unfreeze=[{"steps": 2, "lr": 1e-3, "top_blocks": 0}]),
              method=MethodConfig(kind="lora"))
    bad_metric = TrainConfig(max_steps=2, batch_size=len(setup["rows"]) // 2, early_stopping={"metric": "accuracy"})
    with pytest.raises(RecipeError, match=r"train\.early_stopping\.metric='accuracy' is not a validation metric.*loss"):
        train(setup, tmp_path / "d", bad_metric, evaluate=lambda m: lm_loss(m, setup["validation"], setup["pad"]))
    recipe = Recipe.model_validate({**tiny_recipe_dict(tmp_path), "stage": "dpo", "data": {
        **tiny_recipe_dict(tmp_path)["data"], "format": "preference"}, "train": {"layer_lr": {"decay": 0.8}}})
    with pytest.raises(RecipeError, match=r"train\.layer_lr is not available in stage 'dpo'"):
        controls.check_loop_controls(recipe)


# -- staged unfreezing --------------------------------------------------------------------------
STAGED = {"unfreeze": [{"steps": 3, "lr": 1e-2, "top_blocks": 0}, {"steps": 3, "lr": 5e-3, "top_blocks": 1},
                       {"steps": 3, "lr": 2e-3, "top_blocks": "all"}],
          "layer_lr": {"decay": 0.5}, "scheduler": "linear", "warmup_steps": 0, "batch_size": 4,
          "save_every": 1, "keep_checkpoints": 20, "epochs": 50, "max_steps": 1000}  # the schedule replaces both


@pytest.fixture(scope="module")
def staged_run(setup):
    run = setup["tmp"] / "staged"
    snapshots = {}
    model, result, history = train(setup, run, TrainConfig(**STAGED),
                                   on_step=lambda r, m: snapshots.__setitem__(r["step"], weights(m)))
    snapshots[0] = weights(load_model(setup["model_cfg"], setup["base"]))
    return {"run": run, "result": result, "history": history, "snapshots": snapshots, "final": weights(model)}


def test_staged_unfreezing_trains_head_then_top_block_then_everything(staged_run):
    snaps, history = staged_run["snapshots"], staged_run["history"]
    assert [r["step"] for r in history] == list(range(1, 10))  # 3 stages x 3 steps, not epochs/max_steps
    assert [r["unfreeze_phase"] for r in history] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    names = list(snaps[0])

    def moved(a, b, which):
        return [n for n in which if not torch.equal(snaps[a][n], snaps[b][n])]

    head = ["model.norm.weight", "lm_head.weight"]
    body = [n for n in names if n not in head]
    assert moved(0, 3, body) == [] and moved(0, 3, head) == head  # stage 1: only the head
    top, below = blocks_of(names, 2), [n for n in body if n not in blocks_of(names, 2)]
    assert moved(3, 6, below) == [] and moved(3, 6, top) == top and moved(3, 6, head) == head
    assert moved(6, 9, names) == names  # stage 3: everything, embeddings included

    builds = staged_run["result"].optimizer_builds
    assert [(b["step"], b["phase"]) for b in builds] == [(0, 0), (3, 1), (6, 2)]
    assert [[(g["name"], g["lr"]) for g in b["groups"]] for b in builds] == [
        [("head", 1e-2)],
        [("block.2", 5e-3), ("head", 5e-3)],
        [("block.2", 2e-3), ("block.1", 1e-3), ("block.0", 5e-4), ("embeddings", 2.5e-4), ("head", 2e-3)]]
    # a fresh scheduler per stage: linear decay over the stage's 3 steps (logged after each step)
    assert [r["lr"] for r in history] == pytest.approx([lr * f for lr in (1e-2, 5e-3, 2e-3) for f in (2 / 3, 1 / 3, 0)])
    # the optimizer really was rebuilt: the saved optimizer's groups change at the boundaries
    def saved_lrs(step):
        state = torch.load(staged_run["run"] / "checkpoints" / f"step-{step:07d}" / "optimizer.bin",
                           weights_only=False)
        return [g["initial_lr"] for g in state["param_groups"]]
    assert saved_lrs(3) == [1e-2] and saved_lrs(4) == [5e-3, 5e-3] and len(saved_lrs(7)) == 5


def resume_from(setup, staged_run, tmp_path, step):
    """A copy of the staged run cut back to its checkpoint at `step` (as after a kill), resumed."""
    run = tmp_path / f"from-{step}"
    shutil.copytree(staged_run["run"], run)
    for ckpt in (run / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return train(setup, run, TrainConfig(**STAGED), resume=True)


@pytest.mark.parametrize("step", [3, 5], ids=["at-the-boundary", "inside-stage-2"])
def test_resume_across_an_unfreeze_boundary_reproduces_the_run(setup, staged_run, tmp_path, step):
    model, result, history = resume_from(setup, staged_run, tmp_path, step)
    assert result.resumed_from == step
    assert [b["phase"] for b in result.optimizer_builds] == ([0, 1, 2] if step == 3 else [1, 2])
    straight = staged_run["history"][step:]
    assert [r["loss"] for r in history] == [r["loss"] for r in straight]
    assert [r["lr"] for r in history] == [r["lr"] for r in straight]
    final = weights(model)
    assert all(torch.equal(final[n], staged_run["final"][n]) for n in final)


def test_sigusr1_inside_stage_2_checkpoints_and_resumes_exactly(setup, staged_run, tmp_path):
    run = tmp_path / "signalled"

    def signal_at_5(record, model):
        if record["step"] == 5:
            os.kill(os.getpid(), signal.SIGUSR1)

    _, result, history = train(setup, run, TrainConfig(**STAGED), on_step=signal_at_5)
    assert result.interrupted and result.steps == 5
    assert json.loads((run / "checkpoints" / "step-0000005" / "trainer_state.json").read_text())["unfreeze_phase"] == 1
    model, result, resumed = train(setup, run, TrainConfig(**STAGED), resume=True)
    assert [r["loss"] for r in history + resumed] == [r["loss"] for r in staged_run["history"]]
    final = weights(model)
    assert all(torch.equal(final[n], staged_run["final"][n]) for n in final)


def test_staged_unfreezing_with_lora_keeps_the_peft_base_frozen(setup, tmp_path):
    from ftl.config.schema import MethodConfig
    from ftl.methods import apply_method

    lora = MethodConfig(kind="lora")
    cfg = TrainConfig(unfreeze=[{"steps": 2, "lr": 1e-2, "top_blocks": 1}, {"steps": 2, "lr": 1e-2, "top_blocks": "all"}],
                      batch_size=4, save_every=None)
    model, result, _ = train(setup, tmp_path / "lora", cfg, method=lora)
    after = weights(model)
    adapters = [n for n in after if ".lora_" in n]
    base = weights(apply_method(load_model(setup["model_cfg"], setup["base"]), lora))
    assert all(torch.equal(base[n], after[n]) for n in after if n not in adapters)  # the PEFT base stays frozen
    assert all(after[n].abs().sum() > 0 for n in adapters if ".lora_B." in n)  # zero-initialised, then trained
    assert [b["trainable_tensors"] for b in result.optimizer_builds] == [len(adapters) // 3, len(adapters)]


# -- through `ftl run`: freeze + layer-wise rates, early stopping -----------------------------------
def test_freeze_and_layer_lr_through_ftl_run(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", model={"tiny": TINY3}, train={
        "lr": 1e-2, "max_steps": 6, "save_every": 3, "scheduler": "constant", "warmup_steps": 0,
        "freeze": {"embeddings": True, "bottom_layers": 1, "modules": ["model.layers.1.mlp.*"]},
        "layer_lr": {"decay": 0.5, "head_lr": 2e-2}}, eval={"max_examples": 4, "generate": {"from_validation": 0}},
        track={"output_dir": str(tmp_path / "run"), "plot": False})
    proc = run_ftl("run", str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    base, final = load_file(run / "base" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    frozen = [n for n in base if n == "model.embed_tokens.weight" or n.startswith("model.layers.0.")
              or n.startswith("model.layers.1.mlp.")]
    assert len(frozen) == 1 + 9 + 3
    assert all(torch.equal(base[n], final[n]) for n in frozen)  # bit-identical after training
    assert all(not torch.equal(base[n], final[n]) for n in base if n not in frozen)

    manifest = json.loads((run / "manifest.json").read_text())
    assert sorted(manifest["trainable"]["names"]) == sorted(n for n in base if n not in frozen)
    groups = manifest["optimizer_builds"][0]["groups"]
    assert [(g["name"], g["lr"], g["tensors"]) for g in groups] == [("block.2", 1e-2, 9), ("block.1", 5e-3, 6),
                                                                   ("head", 2e-2, 2)]
    saved = torch.load(run / "checkpoints" / "step-0000006" / "optimizer.bin", weights_only=False)
    assert [g["lr"] for g in saved["param_groups"]] == [1e-2, 5e-3, 2e-2]
    assert "ftl: optimizer" in proc.stdout and "block.1 6 tensors lr 0.005" in proc.stdout


def test_early_stopping_stops_on_a_plateau_and_keeps_the_best_epoch_under_ddp(tmp_path):
    # Two ranks. Two epochs that learn (lr 1e-2, top block + head), then every weight at lr 1e-7: a
    # plateau where no epoch improves by min_delta, so with patience 2 the run stops after epoch 4 of at
    # most 8 and best/ holds epoch 2. The stage boundary rebuilds the DDP wrapper with more parameters.
    recipe = tiny_recipe_dict(tmp_path / "run", data={"limit": 160}, launch={"num_processes": 2}, train={
        "batch_size": 4, "scheduler": "constant", "warmup_steps": 0, "save_every": None, "keep_checkpoints": 10,
        "unfreeze": [{"epochs": 2, "lr": 1e-2, "top_blocks": 1}, {"epochs": 6, "lr": 1e-7, "top_blocks": "all"}],
        "early_stopping": {"metric": "loss", "patience": 2, "min_delta": 1e-3}},
        eval={"max_examples": 8, "generate": {"from_validation": 0}}, track={"output_dir": str(tmp_path / "run"),
                                                                             "plot": False})
    proc = run_ftl("launch", str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    run = tmp_path / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    checks = manifest["rank_checks"]
    assert manifest["world_size"] == 2 and sorted(c["rank"] for c in checks) == [0, 1]
    assert checks[0]["param_digest"] == checks[1]["param_digest"]  # gradients synchronised in both stages
    assert [b["trainable_tensors"] for b in manifest["optimizer_builds"]] == [9 + 2, 2 * 9 + 2 + 1]
    evals = [r for r in read_jsonl(run / "metrics.jsonl") if "eval/loss" in r]
    assert [r["epoch"] for r in evals] == [1, 2, 3, 4]
    assert evals[1]["eval/loss"] < evals[0]["eval/loss"] - 1e-3
    stopping = manifest["early_stopping"]
    assert stopping["stopped_early"] and stopping["best_epoch"] == 2 and stopping["best_value"] == evals[1]["eval/loss"]
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").iterdir())
    assert len(steps) == 4 and steps[-1] == manifest["steps"] == stopping["best_step"] * 2  # one per epoch
    assert json.loads((run / "best" / "best.json").read_text())["epoch"] == 2
    assert (run / "best" / "config.json").exists()  # a model folder like final/
    best = load_file(run / "best" / "model.safetensors")
    epoch2 = load_file(run / "checkpoints" / f"step-{stopping['best_step']:07d}" / "model.safetensors")
    final = load_file(run / "final" / "model.safetensors")
    assert len(best) == len(final) > 0 and best.keys() == final.keys() <= epoch2.keys()  # whole models: not vacuous
    assert all(torch.equal(best[n], epoch2[n]) for n in best)
    assert any(not torch.equal(best[n], final[n]) for n in best)
    assert "early stopping at step" in proc.stdout + proc.stderr
