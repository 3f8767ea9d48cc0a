"""`ftl plan`'s whole peak: one block's saved activations, a micro-batch's activations with and without
gradient checkpointing, the loss's logits (whole or chunked), the KV cache and evaluation, all computed by
hand on a small Llama shape; `model.gradient_checkpointing: auto` and its rule; the run's memory in
`ftl compare`'s table. No training runs here (the manifest's figures: test_sft_run, test_run_folder)."""

import json
from dataclasses import replace

import pytest

from conftest import ROOT
from ftl.config import load_recipe
from ftl.config.schema import ModelConfig
from ftl.errors import RecipeError
from ftl.plan import AUTO_CHECKPOINT_SHARE, GB, checkpointing_choice, decide_checkpointing, make_plan, render_plan
from ftl.plan.memory import (ModelShape, Setup, Workload, activation_bytes, estimate, kv_cache_bytes,
                             layer_bytes_per_token, logits_bytes)

RECIPES = ROOT / "recipes"
# a small Llama: hidden 64, intermediate 128, 2 blocks, 4 heads of 16, 2 key/value heads (width 32), 512 tokens
SHAPE = ModelShape(total=200_000, linear=100_000, largest_layer=32_768, lora=4_096, num_hidden_layers=2,
                   hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512)
FP32 = Setup(method="full", zero_stage=0, devices=1, deepspeed=False, precision="fp32", model_dtype="float32",
             optimizer="adamw")
BF16 = replace(FP32, precision="bf16")  # autocast over fp32 weights
H, I, KV = 64, 128, 32


def test_one_block_saves_what_the_derivation_lists():
    # fp32 with a mask (k and v repeated to every head): layer input, post-attention sum, both norms' x*rsqrt,
    # both linear inputs, q, k, v, sdpa's output: 10 h; SwiGLU's gate, up, silu(gate), product: 4 i
    assert layer_bytes_per_token(SHAPE, FP32, masked=True) == (10 * H + 4 * I) * 4 == 4608
    # no mask: k and v at their own width (2 heads x 16)
    assert layer_bytes_per_token(SHAPE, FP32, masked=False) == (8 * H + 2 * KV + 4 * I) * 4 == 4352
    # bf16 autocast over fp32 weights: residual stream and the norms' insides stay fp32, the rest is bf16
    assert layer_bytes_per_token(SHAPE, BF16, masked=True) == 2 * 4 * H + 2 * 4 * H + 2 * 2 * H + 2 * 4 * H \
        + 4 * 2 * I == 28 * H + 8 * I
    # LoRA r 8 on 7 linear layers: each one's r-wide down-projection output
    lora = replace(SHAPE, lora_r=8, lora_modules_per_layer=7)
    assert layer_bytes_per_token(lora, FP32, masked=True, lora=True) == 4608 + 4 * 8 * 7


def test_a_micro_batch_and_what_checkpointing_keeps_of_it():
    tokens = 4 * 32  # batch 4 x 32 tokens
    final_norm = (4 + 4 + 4) * H  # its input, x*rsqrt and output (lm_head's input)
    unchecked = activation_bytes(SHAPE, FP32, tokens, 32, True, False, False)
    assert unchecked == tokens * (2 * 4608 + final_norm) == 1_277_952
    # checkpointing: each block's input (fp32, h) kept, one block recomputed at a time in backward
    checked = activation_bytes(SHAPE, FP32, tokens, 32, True, True, False)
    assert checked == tokens * (2 * 4 * H + 4608 + final_norm) == 753_664
    deep = replace(SHAPE, num_hidden_layers=32)  # the cut grows with depth: L blocks -> L inputs + 1 block
    ratio = activation_bytes(deep, FP32, tokens, 32, True, True, False) / \
        activation_bytes(deep, FP32, tokens, 32, True, False, False)
    assert ratio == pytest.approx((32 * 4 * H + 4608 + final_norm) / (32 * 4608 + final_norm))
    assert ratio < 0.1


def test_logits_whole_or_chunked_and_the_kv_cache():
    tokens = 4 * 32
    # three live fp32 copies per logit at the loss (12 bytes), plus the bf16 original under autocast (14)
    assert logits_bytes(SHAPE, FP32, tokens) == 12 * tokens * 512 == 786_432
    assert logits_bytes(SHAPE, BF16, tokens) == 14 * tokens * 512
    # a chunked loss holds K tokens' logits at a time; None and 0 mean the whole batch; K >= tokens: no change
    assert logits_bytes(SHAPE, FP32, tokens, loss_chunk_tokens=32) == 12 * 32 * 512 == 196_608
    assert logits_bytes(SHAPE, FP32, tokens, loss_chunk_tokens=0) == logits_bytes(SHAPE, FP32, tokens, None)
    assert logits_bytes(SHAPE, FP32, tokens, loss_chunk_tokens=10_000) == logits_bytes(SHAPE, FP32, tokens)
    # generation's cache: keys and values of every block, 2 kv heads x 16, per cached token per sequence
    assert kv_cache_bytes(SHAPE, FP32, sequences=3, tokens=40) == 2 * 2 * KV * 4 * 3 * 40 == 61_440


def test_the_peak_adds_model_states_to_the_larger_of_training_and_evaluation():
    work = Workload(batch_size=4, seq_len=32, device="cuda", eval_batch_size=8, eval_seq_len=16)
    e = estimate(SHAPE, FP32, work)
    assert e.activations == 1_277_952 and e.logits == 786_432 and e.runtime == 0  # no runtime term on GPU
    assert e.evaluation == 8 * 16 * (3 * I + 4 * H) * 4 + 12 * 8 * 16 * 512  # one block's transient + logits
    assert e.optimizer_step == 4 * SHAPE.total  # AdamW's sqrt(v) temporary, after backward
    assert e.peak == e.device_total + max(e.activations + e.logits, e.optimizer_step, e.evaluation)
    assert e.device_total == 16 * SHAPE.total  # fp32 weights, grads, AdamW's two moments
    chunked = estimate(SHAPE, FP32, replace(work, loss_chunk_tokens=32))
    assert e.peak - chunked.peak == 786_432 - 196_608
    cpu = estimate(SHAPE, FP32, replace(work, device="cpu"))
    assert cpu.runtime > 0.3 * GB and cpu.peak > e.peak + cpu.runtime  # the runtime, and the allocator's slack


def test_auto_turns_checkpointing_on_only_where_activations_dominate():
    lots = estimate(replace(SHAPE, num_hidden_layers=32), FP32, Workload(batch_size=64, seq_len=512, device="cuda"))
    little = estimate(SHAPE, FP32, Workload(batch_size=1, seq_len=8, device="cuda"))
    on, off = decide_checkpointing("auto", lots), decide_checkpointing("auto", little)
    assert on.on and on.auto and (lots.activations_unchecked - lots.activations_checked) >= \
        AUTO_CHECKPOINT_SHARE * lots.peak
    assert not off.on and "only cost time" in off.reason
    assert "memory wins" in on.reason and "activations" in on.reason and "model states" in on.reason
    set_true = decide_checkpointing(True, little)
    assert set_true.on and not set_true.auto and "in the recipe" in set_true.reason


@pytest.mark.parametrize("recipe, profile, overrides, expected", [
    ("sft_chat.yaml", "tiny", [], False),                         # the CPU runtime dwarfs a tiny model's activations
    ("sft_chat.yaml", "small", ["method.kind=full"], False),      # model states and logits dominate
    ("classify_sentiment_zh.yaml", "small", [], True),            # LoRA, fp32, 8 x 128: activations dominate
    ("qlora_single.yaml", "gpu1", ["model.gradient_checkpointing=auto"], True),  # 8B QLoRA at 2048 tokens
    ("qlora_single.yaml", "small", [], True),                     # set in the recipe
])
def test_auto_on_the_shipped_recipes(recipe, profile, overrides, expected):
    loaded = load_recipe(RECIPES / recipe, profile, overrides)
    choice = checkpointing_choice(loaded)
    assert choice.on is expected, choice.reason
    # without the data's lengths the reason says for which rows: data.max_length's
    assert f"x {loaded.data.max_length} tokens (data.max_length, not the data's own lengths)" in choice.reason, \
        choice.reason


def test_auto_decides_for_the_rows_the_data_gives():
    """A run decides once its data is read: RLOO on small with 16 rollouts plans 512 + 24 tokens each from the
    recipe alone (checkpointing on), but its prompts are ~55 tokens, where checkpointing only costs time."""
    from ftl.plan import DataLengths, model_shape

    recipe = load_recipe(RECIPES / "rlhf" / "rloo.yaml", "small",
                         ["model.gradient_checkpointing=auto", "ppo.rollout_batch=4", "ppo.mini_batch=8"])
    shape = model_shape(load_recipe(RECIPES / "rlhf" / "sft.yaml", "small"))  # the policy's architecture
    assert checkpointing_choice(recipe, shape).on is True
    measured = checkpointing_choice(recipe, shape, DataLengths(prompt=55))
    assert measured.on is False and "rollouts 16 x (55 + 24) tokens" in measured.reason, measured.reason
    assert "own lengths" not in measured.reason


def test_the_schema_defaults_to_auto_and_keeps_booleans():
    assert ModelConfig().gradient_checkpointing == "auto"
    assert ModelConfig(gradient_checkpointing=True).gradient_checkpointing is True
    assert ModelConfig(gradient_checkpointing=False).gradient_checkpointing is False
    with pytest.raises(ValueError):
        ModelConfig(gradient_checkpointing="sometimes")


def test_a_model_loaded_outside_a_run_does_not_read_auto_as_true(tmp_path):
    """Only a run resolves auto; a model loaded alone (ftl eval, merge, benches) gets no checkpointing."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftl.models.load import load_model

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    model = load_model(ModelConfig(source="path", path=str(tmp_path)), tmp_path)
    assert not model.is_activation_checkpointing
    assert load_model(ModelConfig(source="path", path=str(tmp_path), gradient_checkpointing=True),
                      tmp_path).is_activation_checkpointing


def test_plan_prints_activations_and_the_checkpointing_choice():
    plan = make_plan(load_recipe(RECIPES / "sft_chat.yaml", "small"))
    text = render_plan(plan)
    assert "| method | ZeRO | offload | checkpointing | model states GB | activations GB | peak GB" in text
    assert "per micro-batch (2 x 256 tokens): activations" in text and "CPU runtime" in text
    assert "ftl: gradient checkpointing off: auto:" in text
    assert plan.chosen.peak > plan.chosen.device_total + plan.chosen.runtime
    rows = [line for line in text.splitlines() if line.startswith("| lora * | 0 | - |")]
    assert len(rows) == 1 and rows[0].split("|")[4].strip() == "off"


def test_an_unloadable_architecture_is_a_recipe_error_not_a_crash():
    recipe = load_recipe(RECIPES / "full_zero3.yaml", "node8")
    assert checkpointing_choice(recipe).on is True  # set in the node8 profile
    broken = load_recipe(RECIPES / "sft_chat.yaml", "tiny", ["model.source=path", "model.path=/nonexistent"])
    with pytest.raises(RecipeError):
        checkpointing_choice(broken)


def test_compare_shows_each_runs_measured_and_planned_peak(tmp_path):
    from ftl.compare import render, summarise
    from ftl.config.schema import CompareConfig

    run = tmp_path / "lora"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({
        "steps": 2, "trainable": {"trainable_params": 10, "trainable_share": 0.01},
        "gradient_checkpointing": {"on": True},
        "memory": {"measure": "host RSS high-water (getrusage ru_maxrss)", "peak_bytes": 2500 * 2**20,
                   "planned": {"peak_bytes": 2400 * 2**20}}}))
    (run / "eval.json").write_text(json.dumps({"after": {"loss": 1.5}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "eval/loss": 1.5}) + "\n")
    row = summarise("lora", run, "loss", CompareConfig(), lr=1e-3, seconds=3.0, peak_kb=3_000_000)
    assert (row["peak_mb"], row["planned_mb"], row["checkpointing"]) == (2500, 2400, True)
    assert row["tree_peak_rss_mb"] == round(3_000_000 / 1024)  # the launched process tree's, kept beside
    table = render([row], "r", "tiny", "loss", CompareConfig(), None)
    assert "| peak memory (MB) | planned (MB) |" in table and "| 2500 | 2400 |" in table
    assert "host RSS high-water" in table


def test_plan_data_reads_the_longest_rows_of_the_recipes_own_data():
    """`ftl plan --data`: packed sft rows fill data.max_length, classification texts and RL prompts are shorter
    than it (so the plan, and its peak, come down from the max_length bound)."""
    from ftl.plan import data_lengths

    sft = load_recipe(RECIPES / "sft_chat.yaml", "tiny")
    lengths = data_lengths(sft)
    assert lengths.train == sft.data.max_length and 0 < lengths.eval <= sft.data.max_length
    ppo = load_recipe(RECIPES / "rlhf" / "ppo.yaml", "tiny", ["model.source=tiny", "model.path=null"])
    prompt = data_lengths(ppo).prompt
    assert 10 < prompt < ppo.data.max_length
    bound, planned = make_plan(ppo), make_plan(ppo, lengths=data_lengths(ppo))
    assert planned.chosen.peak < bound.chosen.peak and f"longest prompt {prompt} tokens" in render_plan(planned)
