"""method.qat: linear layers train fake-quantised (torchao), convert to really quantised weights whose
logits equal the fake-quantised model's, and the run reports QAT against PTQ of a plain fine-tune."""

import copy
import json
import math

import pytest
import torch

from conftest import RECIPES
from ftl.config import load_recipe
from ftl.config.schema import MethodConfig, ModelConfig
from ftl.errors import RecipeError
from ftl.evaluate.qat_report import LOGIT_TOLERANCE, ROWS
from ftl.methods import apply_method
from ftl.methods import qat as q
from ftl.models.load import load_model

RECIPE = RECIPES / "qat_sft.yaml"
TARGETS = 14  # 2 layers x (q, k, v, o, gate, up, down); lm_head stays fp32


def qat_method(**options) -> MethodConfig:
    return MethodConfig.model_validate({"kind": "full", "qat": {"enabled": True, **options}})


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A random tiny Llama (hidden 64, intermediate 128) saved once, and a probe batch."""
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("qat_base")
    tokenizer = train_tiny_tokenizer(["hello there, how are you today?", "fine thanks"] * 50, 300)
    build_tiny_model(ModelConfig().tiny, tokenizer, seed=0).save_pretrained(tmp)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(0))
    return tmp, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def forward(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def test_prepare_fake_quantises_linear_layers_and_trains(tiny_base):
    from torchao.quantization.qat import FakeQuantizedLinear

    base_dir, batch = tiny_base
    plain = load_model(ModelConfig(), base_dir).eval()
    model = apply_method(load_model(ModelConfig(), base_dir), qat_method(group_size=32)).eval()
    fake = q.fake_quantized_layers(model)
    assert len(fake) == TARGETS and all(type(m) is FakeQuantizedLinear for m in fake.values())
    assert type(model.lm_head) is torch.nn.Linear  # the output head is not quantised
    assert model.state_dict().keys() == plain.state_dict().keys()  # final/ stays a normal fp32 checkpoint
    diff = (forward(model, batch) - forward(plain, batch)).abs().max().item()
    assert diff > 1e-3, f"fake quantisation changed nothing (max logit diff {diff})"
    # the weights stay fp32 and receive gradients through the rounding (straight-through)
    model.train()
    model(**batch, use_cache=False).loss.backward()
    weight = model.model.layers[0].mlp.down_proj.weight
    assert weight.dtype == torch.float32 and weight.grad is not None and weight.grad.abs().sum() > 0


def test_recipe_errors_name_the_keys(tiny_base):
    base_dir, _ = tiny_base
    with pytest.raises(RecipeError, match=r"method\.qat\.group_size 48 .*in_features 64.*\[2, 4, 8, 16, 32, 64\]"):
        apply_method(load_model(ModelConfig(), base_dir), qat_method(group_size=48))
    lora = MethodConfig.model_validate({"kind": "lora", "qat": {"enabled": True}})
    with pytest.raises(RecipeError, match=r"method\.qat .*method\.kind 'lora'"):
        apply_method(load_model(ModelConfig(), base_dir), lora)
    with pytest.raises(RecipeError, match=r"method\.qat .*needs method\.kind 'full' and stage 'sft'"):
        load_recipe(RECIPES / "qat_sft.yaml", "tiny", ["method.kind=lora"])


@pytest.mark.parametrize("options,bits", [({"weight_dtype": "int4", "group_size": 32}, 4),
                                          ({"weight_dtype": "int4", "group_size": 64, "activations": True}, 4),
                                          ({"weight_dtype": "int8", "group_size": 32}, 8)])
def test_convert_gives_real_integer_weights_matching_fake_quant(tiny_base, options, bits):
    from torchao.quantization import IntxUnpackedToInt8Tensor

    base_dir, batch = tiny_base
    method = qat_method(**options)
    model = apply_method(load_model(ModelConfig(), base_dir), method).eval()
    fake_logits = forward(model, batch)
    converted = q.convert(copy.deepcopy(model), method.qat)
    assert not q.fake_quantized_layers(converted)
    weights = {n: m.weight for n, m in q.target_linears(converted).items()}
    assert len(weights) == TARGETS
    for name, w in weights.items():
        assert isinstance(w, IntxUnpackedToInt8Tensor), name
        levels = w.qdata.unique().int()  # integers on the bits-wide grid, and most of the grid is used
        assert w.qdata.dtype == torch.int8 and levels.min() >= -2 ** (bits - 1) and levels.max() < 2 ** (bits - 1)
        assert len(levels) > 2 ** bits * 0.6, (name, len(levels))
        assert w.scale.shape[-1] == w.shape[1] // method.qat.group_size  # one scale per group
    assert converted.lm_head.weight.dtype == torch.float32 and not q.is_quantized(converted.lm_head.weight)
    sizes = q.weight_bytes(converted)
    assert sizes["quantized_layers"] == TARGETS
    assert sizes["linear_weight_bytes"] < 0.35 * sizes["linear_weight_bytes_fp32"]  # int8 storage + scales
    diff = (forward(converted, batch) - fake_logits).abs().max().item()
    assert diff <= LOGIT_TOLERANCE, f"converted vs fake-quantised logits differ by {diff}"
    # PTQ of the plain weights with the same config is the same quantised model (convert = PTQ of the
    # QAT-trained weights): the comparison in the report is like for like
    ptq = q.ptq(load_model(ModelConfig(), base_dir).eval(), method.qat)
    assert (forward(ptq, batch) - fake_logits).abs().max().item() <= LOGIT_TOLERANCE


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    from ftl.runner import run_recipe

    run_dir = tmp_path_factory.mktemp("qat_run")
    overrides = ["train.max_steps=20", "train.save_every=10", "track.plot=false", "eval.max_examples=24"]
    summary = run_recipe(RECIPE, "tiny", overrides, run_dir=run_dir)
    return run_dir, summary


def test_the_run_itself_writes_the_qat_report(qat_run):
    # the sft stage calls compare_qat at its end: the report is the run's, not the test's
    run_dir, summary = qat_run
    assert (run_dir / "qat.json").exists() and (run_dir / "qat.md").exists() and (run_dir / "quantized").is_dir()
    assert summary["qat"]["interrupted"] is False
    written = json.loads((run_dir / "qat.json").read_text())
    assert json.loads(json.dumps(summary["qat"]["summary"])) == written["summary"]  # what this run returned


def test_qat_run_converts_and_reports_qat_against_ptq(qat_run):
    from transformers import AutoModelForCausalLM

    run_dir, summary = qat_run
    report = json.loads((run_dir / "qat.json").read_text())
    rows, s = report["rows"], report["summary"]
    assert list(rows) == list(ROWS)
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in rows.values())
    assert len({r["tokens"] for r in rows.values()}) == 1  # every row scored on the same tokens
    # the stage's own final evaluation ran the fake-quantised model: reloading final/ and preparing it again
    # reproduces it, and the converted model scores the same
    after = json.loads((run_dir / "eval.json").read_text())["after"]["loss"]
    assert rows["qat_fake_quant"]["loss"] == pytest.approx(after, abs=1e-5)
    assert rows["qat_converted"]["loss"] == pytest.approx(after, abs=1e-4)
    assert s["max_abs_logit_diff_vs_fake_quant"] <= LOGIT_TOLERANCE
    assert rows["qat_converted"]["quantized_layers"] == rows["plain_ptq"]["quantized_layers"] == TARGETS
    assert rows["plain_fp32"]["quantized_layers"] == rows["qat_fp32"]["quantized_layers"] == 0
    assert s["linear_weight_bytes_quantized"] < 0.35 * s["linear_weight_bytes_fp32"]
    assert s["quantized_safetensors_bytes"] < 0.75 * s["final_safetensors_bytes"]
    # the baseline is a plain fine-tune of the same recipe, trained in the run, that learned too
    plain = load_recipe(run_dir / "ptq_baseline" / "recipe.yaml")
    assert plain.method.kind == "full" and not plain.method.qat.enabled
    before = json.loads((run_dir / "ptq_baseline" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert rows["plain_fp32"]["loss"] < before - 0.5
    # both comparisons are in the reports a user reads
    md = (run_dir / "qat.md").read_text()
    assert "| metric | qat_fake_quant | qat_converted | qat_fp32 | plain_fp32 | plain_ptq |" in md
    eval_md = (run_dir / "eval.md").read_text()
    assert "qat_converted" in eval_md and "plain_ptq" in eval_md
    # quantized/ is a transformers folder with really quantised weights, equal to the converted model
    reloaded = AutoModelForCausalLM.from_pretrained(run_dir / "quantized").eval()
    assert q.weight_bytes(reloaded)["quantized_layers"] == TARGETS
    recipe = load_recipe(RECIPE, "tiny")
    converted = q.convert(q.prepare(load_model(recipe.model, run_dir / "final"), recipe.method), recipe.method.qat)
    ids = torch.arange(3, 40).view(1, -1)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert (forward(reloaded, batch) - forward(converted.eval(), batch)).abs().max().item() <= LOGIT_TOLERANCE
    # final/ is the fp32 QAT checkpoint: plain nn.Linear layers when loaded without ftl
    fp32 = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert type(fp32.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_recipe_profiles_resolve():
    for profile in ("tiny", "small"):
        recipe = load_recipe(RECIPE, profile)
        assert recipe.method.kind == "full" and recipe.method.qat.enabled
