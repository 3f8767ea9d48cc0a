"""`ftl plan`: memory arithmetic checked against the ZeRO paper, DeepSpeed's estimator, and refusals."""

import json

import pytest

from conftest import ROOT, run_ftl, tiny_recipe_dict, write_recipe
from ftl.config import load_recipe
from ftl.plan import Plan, make_plan, model_shape, recipe_setup, render_plan
from ftl.plan.memory import NF4_BYTES, ModelShape, Setup, estimate, zero_paper_bytes

SIZES = [ModelShape(total=n, linear=int(n * 0.9), largest_layer=n // 20, lora=n // 200)
         for n in (125_000_000, 1_300_000_000, 8_030_000_000)]


def bf16_deepspeed(stage, devices, **kw):
    return Setup(method="full", zero_stage=stage, devices=devices, deepspeed=True, precision="bf16",
                 model_dtype="bfloat16", optimizer="adamw", **kw)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s.total / 1e9:.2f}B")
@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("devices", [2, 8, 64])
def test_model_states_are_the_zero_papers_16_bytes_per_parameter(shape, stage, devices):
    e = estimate(shape, bf16_deepspeed(stage, devices))
    assert e.model_states == pytest.approx(zero_paper_bytes(shape.total, devices, stage), rel=1e-12)
    if stage == 3:
        assert e.model_states == pytest.approx(16 * shape.total / devices)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: f"{s.total / 1e9:.2f}B")
@pytest.mark.parametrize("devices", [1, 8, 32])
def test_agrees_with_deepspeeds_own_estimators(shape, devices):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    per_node = min(devices, 8)
    _, ds2, = estimate_zero2_model_states_mem_needs(shape.total, per_node, devices // per_node, cpu_offload=False)
    assert estimate(shape, bf16_deepspeed(2, devices)).device_total == pytest.approx(ds2, rel=0.01)
    _, ds3, _ = estimate_zero3_model_states_mem_needs(shape.total, shape.largest_layer, per_node,
                                                      devices // per_node, cpu_offload=False,
                                                      cpu_offload_params=False)
    # DeepSpeed's stage-3 estimator counts 18 bytes/param; ftl also counts the 16-bit gradient
    # partition next to the fp32 one (20), as measured in the CPU run: within 12%.
    assert estimate(shape, bf16_deepspeed(3, devices)).device_total == pytest.approx(ds3, rel=0.12)
    _, ds3_off, _ = estimate_zero3_model_states_mem_needs(shape.total, shape.largest_layer, per_node,
                                                          devices // per_node, cpu_offload=True,
                                                          cpu_offload_params=False)
    assert estimate(shape, bf16_deepspeed(3, devices, offload_optimizer=True)).device_total == \
        pytest.approx(ds3_off, rel=0.01)


def test_lora_and_qlora_hold_far_less_than_full():
    shape = SIZES[-1]
    single = dict(zero_stage=0, devices=1, deepspeed=False, precision="bf16", model_dtype="bfloat16", optimizer="adamw")
    full, lora, qlora = (estimate(shape, Setup(method=m, **single)).device_total for m in ("full", "lora", "qlora"))
    assert full == pytest.approx(8 * shape.total)  # bf16 weights 2 + grads 2 + Adam m, v in bf16 2 + 2
    assert lora == pytest.approx(2 * shape.total + 8 * shape.lora)
    # embeddings and lm_head are not quantised, and PEFT's prepare_model_for_kbit_training upcasts them to fp32
    assert qlora == pytest.approx(shape.linear * NF4_BYTES + (shape.total - shape.linear) * 4 + 8 * shape.lora)
    assert qlora < 0.45 * lora


def test_model_shape_counts_the_real_architecture():
    recipe = load_recipe(ROOT / "recipes" / "full_zero3.yaml", "node8")
    shape = model_shape(recipe)
    assert shape.total == 8_030_261_248  # Llama-3.1-8B
    assert shape.largest_layer == 128256 * 4096  # the embedding (or lm_head)
    assert shape.lora == 16 * sum(i + o for i, o in [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                                                     (4096, 14336), (4096, 14336), (14336, 4096)]) * 32 // 2


def test_plan_for_node8_fits_and_reports_every_option(tmp_path):
    proc = run_ftl("plan", str(ROOT / "recipes" / "full_zero3.yaml"), "--profile", "node8", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "8,030.3M parameters, 8 device(s)" in out and "DeepSpeed ZeRO-3" in out
    assert f"accelerate launch --config_file {ROOT / 'launch' / 'zero3.yaml'}" in out and "--num_processes 8" in out
    assert "device memory 80.00 GB: fits" in out
    for row in ("| full | 0 | - |", "| full * | 3 | - |", "| lora | 3 | opt+params |", "| qlora | 0 | - |"):
        assert row in out


def test_launch_refuses_a_plan_that_cannot_fit_unless_forced(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", launch={"device_memory_gb": 0.0001})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    refused = run_ftl("launch", str(path), "--dry-run", cwd=tmp_path)
    assert refused.returncode == 2 and "does not fit" in refused.stderr and "--force" in refused.stderr
    assert "DOES NOT FIT" in refused.stdout
    forced = run_ftl("launch", str(path), "--dry-run", "--force", cwd=tmp_path)
    assert forced.returncode == 0 and "accelerate launch" in forced.stdout


def test_every_shipped_deepspeed_json_accumulates_gradients_in_fp32():
    for path in sorted((ROOT / "launch").glob("ds_*.json")):
        assert json.loads(path.read_text())["data_types"] == {"grad_accum_dtype": "fp32"}, path.name


@pytest.mark.parametrize("grad_accum_dtype", ["fp32", "bf16", None])
def test_the_plan_counts_an_fp32_accumulation_buffer_when_the_json_asks_for_one(tmp_path, grad_accum_dtype):
    """Two JSONs differing only in data_types.grad_accum_dtype: only fp32 adds the fp32 buffer, which
    under ZeRO-3 replaces the 16-bit gradient partition (DeepSpeed allocates it in grad_accum_dtype)."""
    config = json.loads((ROOT / "launch" / "ds_zero3.json").read_text())
    config.pop("data_types", None)
    if grad_accum_dtype:
        config["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    (tmp_path / "ds.json").write_text(json.dumps(config))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(
        tmp_path / "run", train={"precision": "bf16"},
        launch={"deepspeed": str(tmp_path / "ds.json"), "num_processes": 8})))
    shape, setup = SIZES[-1], recipe_setup(recipe)
    e, n = estimate(shape, setup), shape.total
    assert setup.zero_stage == 3 and setup.grad_accum_fp32 == (grad_accum_dtype == "fp32")
    if grad_accum_dtype == "fp32":
        assert (e.grads, e.grad_accum) == (0, pytest.approx(4 * n / 8))
        assert e.device_total == pytest.approx(estimate(shape, bf16_deepspeed(3, 8)).device_total + 2 * n / 8)
    else:
        assert (e.grads, e.grad_accum) == (pytest.approx(2 * n / 8), 0)
        assert e.device_total == pytest.approx(estimate(shape, bf16_deepspeed(3, 8)).device_total)
    rendered = render_plan(Plan(recipe, shape, setup, e, None))
    assert ("fp32 grad accumulation 3.74" in rendered) == (grad_accum_dtype == "fp32"), rendered


@pytest.mark.parametrize("stage, grads, grad_accum, fp32_copy", [
    (1, 2.0, 4.0, 0.0),      # BF16_Optimizer: full fp32 buffer beside the full (zeroed) bf16 gradients
    (2, 0.0, 4.0 / 8, 0.0),  # an fp32 partition, itself the step's fp32 gradient
    (3, 0.0, 4.0 / 8, 4.0 / 8)])  # fp32 partitions, still copied (flattened) to fp32 at the step
def test_fp32_accumulation_holds_what_deepspeed_allocates_at_each_zero_stage(stage, grads, grad_accum, fp32_copy):
    """Bytes per parameter on 8 devices, as measured on 2 CPU ranks (bf16 tiny Llama, DeepSpeed 0.19.8):
    stage 1 fp32 grads 4 N next to bf16 grads 2 N; stage 2 an fp32 averaged_gradients partition 4 N/d;
    stage 3 grad_partitions_flat_buffer in fp32, 4 N/d (bf16, 2 N/d, without the key)."""
    n = SIZES[0].total
    e = estimate(SIZES[0], bf16_deepspeed(stage, 8, grad_accum_fp32=True))
    assert (e.grads, e.grad_accum, e.fp32_grad_copy) == (pytest.approx(grads * n), pytest.approx(grad_accum * n),
                                                          pytest.approx(fp32_copy * n))
    offloaded = estimate(SIZES[0], bf16_deepspeed(stage, 8, grad_accum_fp32=True, offload_optimizer=True))
    assert offloaded.grad_accum == 0 and offloaded.host >= e.grad_accum  # the buffer lives with the offload
