"""UPFT (stage upft): prefix labels, the full-length share, masked prompts, a tiny run, resume reuses samples."""

import hashlib
import json
import re
import shutil

import pytest

from conftest import RECIPES, ROOT, read_jsonl, run_ftl, train_losses

RECIPE = str(RECIPES / "upft.yaml")
K, FULL_FRACTION, MAX_LENGTH, STEPS = 8, 0.25, 96, 40  # the tiny profile's settings
IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer():
    from ftl.models.tiny import train_tiny_tokenizer

    return train_tiny_tokenizer(["Hello there, how are you?", "I am fine, thank you very much."] * 4, 300)


def prompt_and_ids(tokenizer, text="Hello there"):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    return prompt, tokenizer(prompt, add_special_tokens=False)["input_ids"]


def labelled(feature):
    return [t for t in feature["labels"] if t != IGNORE]


def test_prefix_sample_trains_exactly_k_response_tokens_and_masks_the_prompt(tokenizer):
    from ftl.stages.upft import encode_upft

    prompt, prompt_ids = prompt_and_ids(tokenizer)
    response = list(range(40, 60))  # 20 sampled tokens, no EOS (hit max_new_tokens)
    f = encode_upft(tokenizer, prompt, response, prefix_tokens=K, full=False, max_length=512)
    assert f["input_ids"] == prompt_ids + response[:K]  # tokens after the prefix are not even fed
    assert f["labels"] == [IGNORE] * len(prompt_ids) + response[:K]
    assert labelled(f) == response[:K]


def test_full_sample_trains_the_whole_response_and_masks_the_prompt(tokenizer):
    from ftl.stages.upft import encode_upft

    prompt, prompt_ids = prompt_and_ids(tokenizer)
    response = list(range(40, 60)) + [tokenizer.eos_token_id]
    f = encode_upft(tokenizer, prompt, response, prefix_tokens=K, full=True, max_length=512)
    assert f["input_ids"] == prompt_ids + response
    assert f["labels"][: len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert labelled(f) == response and len(labelled(f)) == 21


def test_short_response_keeps_its_eos_and_max_length_truncates(tokenizer):
    from ftl.stages.upft import encode_samples, encode_upft

    prompt, prompt_ids = prompt_and_ids(tokenizer)
    short = [41, 42, 43, tokenizer.eos_token_id]  # the model stopped before k tokens
    assert labelled(encode_upft(tokenizer, prompt, short, K, False, 512)) == short
    cut = encode_upft(tokenizer, prompt, list(range(40, 60)), K, True, max_length=len(prompt_ids) + 3)
    assert len(cut["input_ids"]) == len(prompt_ids) + 3 and labelled(cut) == [40, 41, 42]
    samples = [{"split": "train", "prompt": prompt, "response_ids": short, "full": False},
               {"split": "validation", "prompt": prompt, "response_ids": short, "full": False}]
    assert len(encode_samples(tokenizer, samples, "train", K, 512)) == 1
    assert encode_samples(tokenizer, samples, "train", K, max_length=len(prompt_ids)) == []  # nothing to learn


def test_full_share_is_exact_and_chosen_by_seed():
    from ftl.stages.upft import choose_full

    for n in (1, 7, 100, 278):
        for fraction in (0.0, 0.1, 0.25, 1.0):
            chosen = choose_full(n, fraction, seed=0)
            assert len(chosen) == round(fraction * n) and chosen <= set(range(n))
    assert choose_full(100, 0.25, seed=0) == choose_full(100, 0.25, seed=0)
    assert choose_full(100, 0.25, seed=0) != choose_full(100, 0.25, seed=1)


# -- a real tiny run ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upft")
    proc = run_ftl("run", RECIPE, "--profile", "tiny", f"track.output_dir={tmp / 'run'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run", proc


def test_tiny_run_learns_its_own_prefixes(tiny_run):
    run, _ = tiny_run
    losses = train_losses(run)
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses  # measured: 5.85 -> 5.10
    report = json.loads((run / "eval.json").read_text())
    # held-out prompts' own initial samples, first k tokens: measured 5.86 -> 5.21
    assert report["after"]["self_prefix_loss"] < report["before"]["self_prefix_loss"] - 0.4
    assert report["after"]["self_prefix_tokens"] == report["before"]["self_prefix_tokens"] > 0
    assert report["before"]["tokens"] > 0  # reference-answer loss is reported too (never trained on)
    assert "self_prefix_loss" in (run / "eval.md").read_text()


def test_saved_samples_have_the_full_share_and_train_k_tokens(tiny_run):
    from transformers import AutoTokenizer

    from ftl.stages.upft import encode_upft

    run, proc = tiny_run
    samples = read_jsonl(run / "upft_samples.jsonl")
    train = [s for s in samples if s["split"] == "train"]
    full = [s for s in train if s["full"]]
    assert len(full) == round(FULL_FRACTION * len(train)) and 0 < len(full) < len(train)
    manifest = json.loads((run / "manifest.json").read_text())
    upft = manifest["upft"]
    assert (upft["train_samples"], upft["full_samples"], upft["reused"]) == (len(train), len(full), False)
    assert upft["validation_samples"] == len(samples) - len(train) > 0
    assert manifest["data"]["sizes"]["train"] == len(train)  # one sample per training prompt
    assert "ftl: upft: sampled" in proc.stdout

    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    trained = 0
    for s in train:
        assert 0 < len(s["response_ids"]) <= 24 and s["eos"] == (s["response_ids"][-1] == tokenizer.eos_token_id)
        f = encode_upft(tokenizer, s["prompt"], s["response_ids"], K, s["full"], MAX_LENGTH)
        n_prompt = len(tokenizer(s["prompt"], add_special_tokens=False)["input_ids"])
        room = MAX_LENGTH - n_prompt
        expected = s["response_ids"] if s["full"] else s["response_ids"][:K]
        assert f["labels"][:n_prompt] == [IGNORE] * min(n_prompt, MAX_LENGTH)
        assert labelled(f) == expected[:room]
        trained += len(labelled(f))
    assert upft["trained_tokens"] == trained
    # the full share really trains longer responses than k
    assert sum(len(s["response_ids"]) for s in full) / len(full) > 2 * K


def test_resume_reuses_the_saved_samples(tiny_run, tmp_path):
    original, _ = tiny_run
    run = tmp_path / "run"
    shutil.copytree(original, run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:07d}")  # interrupted after step 32
    samples_file = run / "upft_samples.jsonl"
    edited = [{**s, "full": False} for s in read_jsonl(samples_file)]  # a resample could not produce this
    samples_file.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in edited))
    before = samples_file.read_bytes()

    proc = run_ftl("run", RECIPE, "--profile", "tiny", f"track.output_dir={run}", "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "reuses the saved samples" in out and "ftl: upft: sampled" not in out
    assert "resumed from" in out
    assert samples_file.read_bytes() == before
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["resumed_from_step"] == STEPS - 8
    assert manifest["upft"]["reused"] is True and manifest["upft"]["full_samples"] == 0
    assert manifest["upft"]["sha256"] == hashlib.sha256(before).hexdigest()[:16]
    resumed, straight = train_losses(run), train_losses(original)
    assert len(resumed) == STEPS and resumed[: STEPS - 8] == straight[: STEPS - 8]
    assert resumed[STEPS - 8:] != straight[STEPS - 8:]  # the last steps trained on the edited samples


def test_resume_with_other_sampling_settings_is_refused(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    proc = run_ftl("run", RECIPE, "--profile", "tiny", f"track.output_dir={run}", "upft.temperature=0.5",
                   "--resume", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # the resume contract answers before the samples are read: the sampling settings are training-relevant
    assert re.search(r"upft\.temperature: [0-9.]+ → 0\.5", proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


ZERO3 = [f"launch.config_file={ROOT / 'launch' / 'zero3.yaml'}",
         f"launch.deepspeed={ROOT / 'launch' / 'ds_zero3.json'}"]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "zero3"])
def test_two_ranks_sample_exactly_what_one_process_samples(tmp_path, sharding):
    """DDP: each rank draws its share of the batches; the gathered file equals a one-process draw.
    ZeRO-3: the same, sampled with a whole copy of the base on each rank, while training holds half."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import free_port
    from ftl.config import load_recipe
    from ftl.stages.upft import sample_responses

    run = tmp_path / "run"
    overrides = [f"track.output_dir={run}", f"launch.main_process_port={free_port()}"]
    overrides += ZERO3 if sharding == "zero3" else []
    proc = run_ftl("launch", RECIPE, "--profile", "tiny_ddp", *overrides, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    checks = manifest["rank_checks"]
    assert manifest["world_size"] == 2 and "on 2 rank(s)" in proc.stdout
    if sharding == "zero3":
        assert all(c["zero"]["param_numel_local"] * 2 == c["zero"]["param_numel_full"] for c in checks)
        losses = train_losses(run)
        assert sum(losses[-3:]) < sum(losses[:3])
        trained = AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)  # gathered whole
        base = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
        assert trained.num_parameters() == base.num_parameters() == checks[0]["zero"]["param_numel_full"]
    else:
        assert len({c["param_digest"] for c in checks}) == 1

    recipe = load_recipe(RECIPE, "tiny_ddp", overrides)
    samples = read_jsonl(run / "upft_samples.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(run / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(run / "base", dtype=torch.float32)
    jobs = [{k: s[k] for k in ("split", "prompt_index", "sample", "prompt")} for s in samples]
    alone = sample_responses(model, tokenizer, jobs, recipe.upft, recipe.train.seed, recipe.eval.batch_size)
    assert [a["response_ids"] for a in alone] == [s["response_ids"] for s in samples]


def test_prompts_without_answers_read_as_auto_train_and_report_no_reference_loss(tmp_path):
    """data.format auto: the reference-answer loss follows the kind of record the rows turned out to be
    (session.record_kinds), here bare prompts, so there is none, while the self-prefix loss is reported."""
    rows = [{"prompt": f"Tell me about topic number {i}, please."} for i in range(40)]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_ftl("run", RECIPE, "--profile", "tiny", f"track.output_dir={tmp_path / 'run'}",
                   f"data.source={{kind: jsonl, path: {data}}}", "data.format=auto", "train.max_steps=2",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["after"]["self_prefix_tokens"] > 0
    assert "tokens" not in report["after"] and "loss" not in report["after"], report["after"]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert "prompts" in json.dumps(manifest["data"]), manifest["data"]
