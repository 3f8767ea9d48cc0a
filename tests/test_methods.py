"""Every method on the tiny model: it trains, frozen weights stay bit-identical, adapters save alone and
reload exactly, and merges match the adapter model. Plus the CPU 4-bit gradient guard."""

import pytest
import torch

from conftest import tiny_recipe_dict
from ftl.config.schema import DataConfig, LaunchConfig, MethodConfig, ModelConfig, TrainConfig
from ftl.data import load_splits
from ftl.data.packing import collate, pack_sequences
from ftl.data.tokenize import encode_records
from ftl.evaluate.lm import causal_lm_loss, lm_loss
from ftl.methods import METHODS as METHOD_TABLE, apply_method, load_trained, save_trained, trainable_summary
from ftl.models.load import base_model_dir, load_model, record_texts
from ftl.models.tiny import train_tiny_tokenizer
from ftl.train.distributed import make_accelerator
from ftl.train.loop import fit

# method → (options, learning rate, required drop of the training-set loss, measured in eval mode)
METHODS = {
    "full": ({}, 1e-2, 1.0),
    "lora": ({"lora": {"r": 8, "alpha": 16}}, 1e-2, 0.25),
    "dora": ({"lora": {"r": 8, "alpha": 16}}, 1e-2, 0.25),
    "qlora": ({"lora": {"r": 8, "alpha": 16}}, 1e-2, 0.25),
    "lora8bit": ({"lora": {"r": 8, "alpha": 16}}, 1e-2, 0.25),
    "adapter": ({"adapter": {"bottleneck": 16}}, 3e-2, 0.15),
    "ia3": ({}, 1e-1, 0.08),
    # virtual-token methods have little capacity on a 2-layer, 64-wide model: small but real drops
    "prefix": ({"prompt": {"num_virtual_tokens": 8}}, 1e-1, 0.02),
    "llama_adapter": ({"llama_adapter": {"adapter_len": 4, "adapter_layers": 2}}, 1e-1, 0.015),
    "ptuning": ({"prompt": {"num_virtual_tokens": 8, "encoder_hidden_size": 32}}, 1e-1, 0.008),
    "prompt": ({"prompt": {"num_virtual_tokens": 8}}, 3e-1, 0.008),
}


STEPS = 30


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("methods")
    recipe = tiny_recipe_dict(tmp / "run")
    data = DataConfig.model_validate({**recipe["data"], "limit": 300})
    records = load_splits(data)[0].train
    tokenizer = train_tiny_tokenizer(record_texts(records), 400)
    model_cfg = ModelConfig(source="tiny")  # hidden 64: the bitsandbytes CPU repack path needs it
    features = encode_records(tokenizer, records, data)
    # PEFT methods start from a *pretrained* model: a random one has near-uniform logits that adapters
    # on the blocks can hardly move. Pre-train the tiny base briefly (full fine-tune), then freeze it.
    model = load_model(model_cfg, base_model_dir(model_cfg, tokenizer, 0, tmp))
    train = TrainConfig(lr=1e-2, max_steps=40, batch_size=4, warmup_steps=0, scheduler="constant", save_every=None)
    pad = tokenizer.pad_token_id
    model, _ = fit(accelerator=make_accelerator(train, LaunchConfig()), model=model, cfg=train,
                   features=pack_sequences(features, 96), collate=lambda rs: collate(rs, pad),
                   loss_fn=causal_lm_loss, run_dir=tmp / "pretraining", log=lambda r: None, progress=False)
    model.save_pretrained(tmp / "pretrained")
    return {"tmp": tmp, "tokenizer": tokenizer, "model_cfg": model_cfg, "base": tmp / "pretrained",
            "features": features}


def load_method(setup, kind, options):
    method = MethodConfig.model_validate({"kind": kind, **options})
    model = load_model(setup["model_cfg"], setup["base"], METHOD_TABLE[kind].quant_bits, method.quant)
    return apply_method(model, method), method


def frozen_snapshot(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


@torch.no_grad()
def logits(model, batch):
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return out[:, -batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("kind", list(METHODS))
def test_method_trains_keeps_frozen_weights_and_reloads_exactly(setup, kind, tmp_path):
    options, lr, margin = METHODS[kind]
    model, method = load_method(setup, kind, options)
    summary = trainable_summary(model)
    assert summary["trainable_params"] > 0
    assert (summary["trainable_share"] == 1.0) if kind == "full" else (0 < summary["trainable_share"] < 0.5)
    frozen = frozen_snapshot(model)
    assert bool(frozen) == (kind != "full")

    features = setup["features"][:16]  # a small set every method can fit within a few steps
    rows = pack_sequences(features, 96) if METHOD_TABLE[kind].packs else features
    train = TrainConfig(lr=lr, max_steps=STEPS, batch_size=4, warmup_steps=0, scheduler="constant",
                        save_every=None, grad_clip=None, seed=0)
    torch.manual_seed(0)
    accelerator = make_accelerator(train, LaunchConfig())
    pad = setup["tokenizer"].pad_token_id
    before = lm_loss(model, features, pad)["loss"]
    history = []
    model, result = fit(accelerator=accelerator, model=model, cfg=train, features=rows,
                        collate=lambda rs: collate(rs, pad), loss_fn=causal_lm_loss, run_dir=tmp_path,
                        log=history.append, progress=False)
    after = lm_loss(model, features, pad)["loss"]  # same examples, same positions, eval mode
    assert after < before - margin, (kind, before, after, [h["loss"] for h in history])

    model = accelerator.unwrap_model(model)
    for name, before in frozen.items():  # bit-identical, including packed 4-bit / 8-bit weights
        assert torch.equal(dict(model.named_parameters())[name].detach(), before), name

    batch = collate(features[:4], pad)
    trained = logits(model, batch)
    if kind == "full":
        return
    save_trained(model, model.state_dict(), tmp_path / "adapter", method)
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert size < 0.5 * sum(p.stat().st_size for p in setup["base"].glob("*.safetensors"))  # small
    fresh = load_model(setup["model_cfg"], setup["base"], METHOD_TABLE[kind].quant_bits, method.quant)
    reloaded = load_trained(fresh, tmp_path / "adapter", method)
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-5, rtol=1e-5)


def test_bottleneck_adapter_starts_as_the_identity(setup):
    batch = collate(setup["features"][:4], setup["tokenizer"].pad_token_id)
    base = load_model(setup["model_cfg"], setup["base"])
    reference = logits(base, batch)
    adapted, _ = load_method(setup, "adapter", {"adapter": {"bottleneck": 8, "positions": ["attention", "mlp"]}})
    assert torch.equal(logits(adapted, batch), reference)
    names = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert len(names) == 2 * 2 * 4  # 2 layers x (attention, mlp) x (down, up) x (weight, bias)


def lora_grads(model, batch) -> dict:
    model.train()
    model.zero_grad()
    loss, _ = causal_lm_loss(model, batch)
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in open("/proc/cpuinfo").read()
    except OSError:
        return False


def test_qlora_gradients_match_fp32_dequantised_model_before_and_after_eval(setup):
    """The CPU bug: after an eval-mode forward, 4-bit backward used a kernel without autograd."""
    import bitsandbytes as bnb

    batch = collate(setup["features"][:4], setup["tokenizer"].pad_token_id)
    quantised, method = load_method(setup, "qlora", METHODS["qlora"][0])
    torch.manual_seed(1)
    for name, param in quantised.named_parameters():
        if "lora_B" in name:  # B starts at zero; make A's gradients non-trivial too
            torch.nn.init.normal_(param, std=0.05)
    reference = load_model(setup["model_cfg"], setup["base"], 4, method.quant).dequantize().float()
    reference = apply_method(reference, method)
    reference.load_state_dict({k: v for k, v in quantised.state_dict().items() if "lora_" in k}, strict=False)

    expected = lora_grads(reference, batch)
    before = lora_grads(quantised, batch)
    quantised.eval()
    with torch.no_grad():
        quantised(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    after = lora_grads(quantised, batch)
    for grads in (before, after):
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-5, rtol=1e-3)
    layers = [m for m in quantised.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)

    if cpu_has_avx512_bf16():  # without the guard the same check fails on this kind of CPU
        unguarded, _ = load_method(setup, "qlora", METHODS["qlora"][0])
        unguarded.load_state_dict({k: v for k, v in quantised.state_dict().items() if "lora_" in k}, strict=False)
        for m in unguarded.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = True
        unguarded.eval()
        with torch.no_grad():
            unguarded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        wrong = lora_grads(unguarded, batch)
        worst = max(((wrong[n] - g).norm() / g.norm()).item() for n, g in expected.items() if g.norm() > 0)
        assert worst > 0.1, f"expected the unguarded 4-bit path to give wrong gradients, worst error {worst}"


@pytest.mark.parametrize("kind", ["qlora", "dora"])
def test_merged_model_matches_the_adapter_model(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    from conftest import ROOT, run_ftl
    from ftl.models.trained import load_trained_causal_lm

    run_dir = tmp_path / "run"
    proc = run_ftl("run", str(ROOT / "recipes" / "qlora_single.yaml"), "--profile", "tiny", f"method.kind={kind}",
                   "train.max_steps=8", "eval.generate.prompts=[]", "eval.generate.from_validation=0",
                   f"track.output_dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged_proc = run_ftl("merge", str(run_dir), cwd=tmp_path)
    assert merged_proc.returncode == 0, merged_proc.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "merged").eval()
    config = (run_dir / "merged" / "config.json").read_text()
    assert "quantization_config" not in config  # a plain model folder, de-quantised
    assert not any("lora" in name for name, _ in merged.named_parameters())
    adapter_model, tokenizer, _ = load_trained_causal_lm(run_dir)  # 4-bit base + adapter for qlora
    ids = tokenizer(["Hello, how are you?", "What is AI?"], padding=True, return_tensors="pt")
    batch = {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask}
    torch.testing.assert_close(logits(merged, batch), logits(adapter_model, batch), atol=1e-4, rtol=1e-4)
