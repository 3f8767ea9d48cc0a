"""Checkpoints of runs with a frozen base hold what trains, not the base (ftl.train.frozen_base), and resume
bit-exactly: LoRA, QLoRA (4-bit base), prefix tuning, a bottleneck adapter, train.freeze with gradual
unfreezing (blocks a later phase opens are saved from the start), a changed base refused by name; full
fine-tuning keeps the whole model. In-process fits on a tiny Llama, plus one `ftl run` resume of a
classifier whose frozen fresh head must be rebuilt identically."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, read_jsonl, run_ftl, tiny_recipe_dict
from ftl.config.schema import DataConfig, LaunchConfig, MethodConfig, ModelConfig, TrainConfig
from ftl.data import load_splits
from ftl.data.packing import collate, pack_sequences
from ftl.data.tokenize import encode_records
from ftl.errors import RecipeError
from ftl.evaluate.lm import causal_lm_loss
from ftl.methods import METHODS, apply_method
from ftl.models.load import base_model_dir, load_model, record_texts
from ftl.models.tiny import train_tiny_tokenizer
from ftl.train.distributed import make_accelerator
from ftl.train.frozen_base import DIGEST_FILE
from ftl.train.loop import fit

# dropout on: a resume must also restore the RNG states exactly
METHOD_OPTIONS = {
    "full": {},
    "lora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    "qlora": {"lora": {"r": 4, "alpha": 8, "dropout": 0.1}},
    "prefix": {"prompt": {"num_virtual_tokens": 4}},
    "adapter": {"adapter": {"bottleneck": 8}},
}
STEPS, SAVE_EVERY, CUT = 8, 2, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapter-checkpoints")
    data = DataConfig.model_validate({**tiny_recipe_dict(tmp)["data"], "limit": 200})
    records = load_splits(data)[0].train
    tokenizer = train_tiny_tokenizer(record_texts(records), 400)
    model_cfg = ModelConfig(source="tiny")  # hidden 64: the bitsandbytes CPU 4-bit path needs it
    return {"model_cfg": model_cfg, "base": base_model_dir(model_cfg, tokenizer, 0, tmp),
            "features": encode_records(tokenizer, records, data)[:64], "pad": tokenizer.pad_token_id}


def build(setup, kind):
    """The model a fresh run and its resume both build: the base from its folder, then the method."""
    method = MethodConfig.model_validate({"kind": kind, **METHOD_OPTIONS[kind]})
    return apply_method(load_model(setup["model_cfg"], setup["base"], METHODS[kind].quant_bits, method.quant), method)


def train(setup, kind, run_dir, resume=False, model=None, **train_options):
    model = model if model is not None else build(setup, kind)
    cfg = TrainConfig(**{"lr": 1e-2, "max_steps": STEPS, "batch_size": 4, "warmup_steps": 0, "scheduler": "linear",
                         "save_every": SAVE_EVERY, "keep_checkpoints": 10, **train_options})
    rows = pack_sequences(setup["features"], 96) if METHODS[kind].packs else setup["features"]
    history = []
    accelerator = make_accelerator(cfg, LaunchConfig())
    fitted, result = fit(accelerator=accelerator, model=model, cfg=cfg, features=rows,
                         collate=lambda rs: collate(rs, setup["pad"]), loss_fn=causal_lm_loss, run_dir=run_dir,
                         log=history.append, resume=resume, progress=False)
    return accelerator.unwrap_model(fitted), result, [r["loss"] for r in history]


def checkpoint(run_dir, step):
    return run_dir / "checkpoints" / f"step-{step:07d}"


def folder_bytes(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cut_back(run_dir, tmp_path, step):
    """A copy of a finished run with only its checkpoints up to `step`: the state a kill after `step` leaves."""
    copy = tmp_path / f"cut-{step}"
    shutil.copytree(run_dir, copy)
    for ckpt in (copy / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return copy


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def full_run(setup, tmp_path_factory):
    run = tmp_path_factory.mktemp("full") / "run"
    train(setup, "full", run)
    return run


def test_full_fine_tuning_checkpoints_keep_the_whole_model(setup, full_run):
    saved = load_file(checkpoint(full_run, CUT) / "model.safetensors")
    assert set(saved) == {n for n, _ in build(setup, "full").named_parameters()}
    assert not (checkpoint(full_run, CUT) / DIGEST_FILE).exists()  # accelerate's format, untouched


@pytest.mark.parametrize("kind", ["lora", "qlora", "prefix", "adapter"])
def test_checkpoint_holds_only_what_trains_and_resumes_exactly(setup, full_run, kind, tmp_path):
    model = build(setup, kind)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    straight, _, losses = train(setup, kind, tmp_path / "run", model=model)

    ckpt = checkpoint(tmp_path / "run", CUT)
    saved = load_file(ckpt / "model.safetensors")
    assert set(saved) == trainable  # no frozen base tensor, not even 4-bit quantisation state
    assert not [k for k in saved if any(k == f or k.startswith(f + ".") for f in frozen)]
    digests = json.loads((ckpt / DIGEST_FILE).read_text())["model.safetensors"]
    assert set(digests) == frozen
    ratio = folder_bytes(ckpt) / folder_bytes(checkpoint(full_run, CUT))
    print(f"{kind}: checkpoint {folder_bytes(ckpt)} bytes, {100 * ratio:.1f}% of full fine-tuning's")
    assert ratio < 0.25, ratio

    resumed, result, resumed_losses = train(setup, kind, cut_back(tmp_path / "run", tmp_path, CUT), resume=True)
    assert result.resumed_from == CUT
    assert resumed_losses == losses[CUT:]
    a, b = weights(resumed), weights(straight)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)  # frozen ones (4-bit packed) too


def test_a_base_changed_since_the_checkpoint_is_refused_by_name(setup, tmp_path):
    train(setup, "lora", tmp_path / "run", max_steps=SAVE_EVERY)
    model = build(setup, "lora")
    name, param = next((n, p) for n, p in model.named_parameters() if "q_proj.base_layer" in n)
    with torch.no_grad():
        param.add_(1e-3)  # as if the base folder had been replaced
    with pytest.raises(RecipeError, match="frozen tensor.*differ") as err:
        train(setup, "lora", tmp_path / "run", resume=True, model=model, max_steps=2 * SAVE_EVERY)
    assert name in str(err.value)


def test_gradual_unfreezing_saves_blocks_a_later_phase_opens(setup, tmp_path):
    """train.freeze.embeddings freezes the embeddings for the whole run: they are left out. Phase 1 trains the
    top block only, yet its checkpoints already hold the lower block, which phase 2 opens."""
    options = {"freeze": {"embeddings": True}, "save_every": 1,
               "unfreeze": [{"steps": 3, "lr": 1e-2, "top_blocks": 1}, {"steps": 3, "lr": 5e-3, "top_blocks": "all"}]}
    straight, _, losses = train(setup, "full", tmp_path / "run", **options)
    saved = load_file(checkpoint(tmp_path / "run", 2) / "model.safetensors")
    names = {n for n, _ in straight.named_parameters()}
    assert "model.embed_tokens.weight" not in saved
    assert {n for n in names if n.startswith("model.layers.0.")} <= set(saved)  # frozen in phase 1, saved
    assert set(saved) == names - {"model.embed_tokens.weight"}

    resumed, _, resumed_losses = train(setup, "full", cut_back(tmp_path / "run", tmp_path, 2), resume=True,
                                       **options)
    assert resumed_losses == losses[2:]
    a, b = weights(resumed), weights(straight)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_classifier_whose_frozen_new_head_is_rebuilt_resumes_exactly(tmp_path):
    """PEFT keeps a frozen copy of a classifier's new head, drawn at random when the model is built; the
    checkpoint leaves it to the rebuild, so a fresh run and its resume must draw it alike (they did not while
    only a fresh tiny run built its base first)."""
    recipe = str(ROOT / "recipes" / "classify_topic.yaml")
    args = ["--profile", "tiny", "method.kind=lora", "train.max_steps=12", "train.save_every=4",
            "eval.before_training=false", "eval.every=null"]
    straight = run_ftl("run", recipe, *args, f"track.output_dir={tmp_path / 'run'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-3000:]
    cut = cut_back(tmp_path / "run", tmp_path, 8)
    shutil.rmtree(cut / "final")
    resumed = run_ftl("run", recipe, *args, f"track.output_dir={cut}", "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "ftl: resumed from" in resumed.stdout + resumed.stderr
    assert [r["loss"] for r in read_jsonl(cut / "metrics.jsonl") if "loss" in r] == \
        [r["loss"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    a, b = (load_file(run / "final" / "adapter_model.safetensors") for run in (cut, tmp_path / "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
