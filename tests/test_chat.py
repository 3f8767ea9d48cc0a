"""Chat templates set in the recipe and `ftl chat` (issue #15).

`data.chat_template` names a template (llama3) or a Jinja file; the run saves it with its tokenizer (final/
included) and trains exactly the assistant turns it renders. `ftl chat RUN --prompt` prints what greedy
generation through that tokenizer's template gives, on a full fine-tune and on a LoRA adapter over its base;
without --prompt it holds a conversation read from stdin. Classifiers and reward models are refused.

Two tiny runs in this process (one interpreter start): llama3 + a system prompt with full fine-tuning, and a
Jinja file (named relative to the recipe) with LoRA.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_recipe_dict, write_recipe
from ftl.cli import main
from ftl.data.chat_templates import CHAT_TEMPLATES, render_template

SYSTEM = "Answer briefly."
# a template of the user's own: turns closed by </turn>, which a tiny tokenizer then learns as its EOS
TURNS_TEMPLATE = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '</turn>\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
MAX_NEW = 12


def ftl(*argv) -> int:
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    return done.value.code


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("chat")
    (tmp / "templates").mkdir()
    (tmp / "templates" / "turns.jinja").write_text(TURNS_TEMPLATE)
    short = {"max_steps": 4, "save_every": None}
    recipes = {
        "llama3": tiny_recipe_dict(tmp / "llama3", data={"chat_template": "llama3", "system_prompt": SYSTEM},
                                   train={**short, "lr": 1e-3}),  # near its random start: replies vary with the context
        # relative to the recipe file's folder, like every path in a recipe
        "lora": tiny_recipe_dict(tmp / "lora", data={"chat_template": "templates/turns.jinja"},
                                 method={"kind": "lora"}, train={**short, "lr": 5e-2}),
    }
    for name, recipe in recipes.items():
        recipe["eval"] = {"max_examples": 8, "before_training": False, "generate": {"from_validation": 0}}
        assert ftl("run", write_recipe(tmp / f"{name}.yaml", recipe)) == 0
    return {"tmp": tmp, **{name: tmp / name for name in recipes}}


def saved_template(folder: Path) -> str:
    """The chat template a save_pretrained folder holds (chat_template.jinja, or tokenizer_config.json)."""
    jinja = folder / "chat_template.jinja"
    return jinja.read_text() if jinja.exists() else json.loads((folder / "tokenizer_config.json").read_text())[
        "chat_template"]


def greedy(folder_or_model, tokenizer, messages: list[dict], max_new_tokens: int = MAX_NEW) -> str:
    """Greedy generation by hand: the template with its generation prompt, stop at EOS, special tokens dropped."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder_or_model) if isinstance(folder_or_model, Path) \
        else folder_or_model
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def chat_stdout(capsys, *argv) -> str:
    capsys.readouterr()
    assert ftl("chat", *argv, "--max-new-tokens", MAX_NEW) == 0
    return capsys.readouterr().out


# -- data.chat_template ------------------------------------------------------------------------------
def test_llama3_renders_a_system_prompt_and_the_generation_prompt():
    text = CHAT_TEMPLATES["llama3"].text
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
    head = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>"
            "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>")
    assert render_template(text, messages, generation=True) == head + \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    answered = messages + [{"role": "assistant", "content": " hello "}]
    assert render_template(text, answered, generation=False) == head + \
        "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>"


def test_llama3_run_saves_the_template_and_trains_exactly_the_assistant_turns(runs):
    from transformers import AutoTokenizer

    from ftl.config import load_recipe
    from ftl.data import load_splits
    from ftl.data.tokenize import IGNORE, encode_record

    run, template = runs["llama3"], CHAT_TEMPLATES["llama3"]
    for folder in (run / "final", run / "tokenizer"):
        assert saved_template(folder) == template.text, folder
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.eos_token == "<|eot_id|>"
    assert all(len(tokenizer(m, add_special_tokens=False).input_ids) == 1 for m in template.markers)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["chat_template"] == {"source": "llama3",
                                         "sha256": hashlib.sha256(template.text.encode()).hexdigest()}

    recipe = load_recipe(run / "recipe.yaml")
    checked = 0
    for record in load_splits(recipe.data)[0].train[:60]:
        encoded = encode_record(tokenizer, record, recipe.data.max_length, recipe.data.system_prompt)
        if encoded.truncated:
            continue
        spans, current = [], []  # the labelled tokens, as runs of consecutive positions
        for token, label in zip(encoded.input_ids, encoded.labels):
            if label != IGNORE:
                assert label == token
                current.append(token)
            elif current:
                spans, current = spans + [current], []
        spans += [current] if current else []
        trained = [tokenizer.decode(span) for span in spans]
        assert trained == [m["content"].strip() + "<|eot_id|>" for m in record["messages"] if m["role"] == "assistant"]
        rendered = tokenizer.decode(encoded.input_ids)
        assert rendered.startswith(f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>")
        checked += 1
    assert checked >= 20


def test_a_jinja_file_relative_to_the_recipe_is_read_saved_and_recorded(runs):
    from transformers import AutoTokenizer

    path = runs["tmp"] / "templates" / "turns.jinja"
    run = runs["lora"]
    assert yaml.safe_load((run / "recipe.yaml").read_text())["data"]["chat_template"] == str(path)
    assert saved_template(run / "final") == TURNS_TEMPLATE
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    assert tokenizer.eos_token == "</turn>"  # the file's end of turn, learnt by the tiny tokenizer as one token
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["chat_template"] == {"source": str(path), "sha256": hashlib.sha256(TURNS_TEMPLATE.encode()).hexdigest()}


def test_print_config_shows_the_key_as_written(runs, capsys):
    capsys.readouterr()
    assert ftl("run", runs["tmp"] / "llama3.yaml", "--print-config") == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["chat_template"] == "llama3"


# -- ftl chat ---------------------------------------------------------------------------------------------
def test_one_prompt_on_a_full_run_is_greedy_generation_with_its_template_and_system_prompt(runs, capsys):
    from transformers import AutoTokenizer

    run = runs["llama3"]
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    user = {"role": "user", "content": "Hello, how are you?"}
    expected = greedy(run / "final", tokenizer, [{"role": "system", "content": SYSTEM}, user])
    assert expected  # a reply with text in it, not an immediate stop
    without_system = greedy(run / "final", tokenizer, [user])
    assert without_system != expected  # the system prompt matters to this model
    assert chat_stdout(capsys, run, "--prompt", user["content"]) == expected + "\n"  # the run's system prompt
    assert chat_stdout(capsys, run, "--prompt", user["content"], "--system", "") == without_system + "\n"


def test_one_prompt_on_a_lora_run_uses_the_adapter_on_its_base(runs, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = runs["lora"]
    assert (run / "final" / "adapter_config.json").exists() and not (run / "final" / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    messages = [{"role": "user", "content": "What is your name?"}]
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), run / "final")
    expected = greedy(adapted, tokenizer, messages)
    assert expected != greedy(run / "base", tokenizer, messages)  # the adapter changes the reply
    assert chat_stdout(capsys, run, "--prompt", messages[0]["content"]) == expected + "\n"


def test_a_conversation_on_piped_stdin_keeps_its_history_until_reset(runs, capsys, monkeypatch):
    from transformers import AutoTokenizer

    run = runs["llama3"]
    tokenizer = AutoTokenizer.from_pretrained(run / "final")
    system, first, second = ({"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"},
                             {"role": "user", "content": "What is AI?"})
    reply1 = greedy(run / "final", tokenizer, [system, first])
    reply2 = greedy(run / "final", tokenizer, [system, first, {"role": "assistant", "content": reply1}, second])
    assert reply2 != greedy(run / "final", tokenizer, [system, second])  # the history matters to this model
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\nWhat is AI?\n/reset\n\nWhat is AI?\n/exit\nHello\n"))
    capsys.readouterr()
    assert ftl("chat", run, "--max-new-tokens", MAX_NEW) == 0
    captured = capsys.readouterr()
    third = greedy(run / "final", tokenizer, [system, second])  # after /reset: no history; /exit ends it
    assert captured.out == f"{reply1}\n{reply2}\n{third}\n"
    assert "conversation reset" in captured.err


# -- refusals -----------------------------------------------------------------------------------------
def refused(capsys, argv: list, expected: str) -> None:
    capsys.readouterr()
    assert ftl("chat", *argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("ftl: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]


def test_classifiers_reward_models_and_bad_targets_are_refused(runs, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, LlamaConfig

    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    for name, labels in (("reward_model", 1), ("classifier", 3)):
        config.num_labels = labels
        AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / name)
        refused(capsys, [tmp_path / name, "--prompt", "hi"],
                f"{tmp_path / name} is a {name.replace('_', ' ')} folder (a sequence classifier): ftl chat talks "
                "to language models")
    reward_run = tmp_path / "reward_run"
    reward_run.mkdir()
    write_recipe(reward_run / "recipe.yaml", tiny_recipe_dict(reward_run, stage="reward", data={"format": "preference"}))
    refused(capsys, [reward_run, "--prompt", "hi"], f"{reward_run} holds a reward model (stage 'reward')")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "recipe.yaml").write_text((runs["llama3"] / "recipe.yaml").read_text())
    refused(capsys, [unfinished, "--prompt", "hi"], "no 'final' model (has the run finished?)")
    refused(capsys, [tmp_path / "nothing", "--prompt", "hi"], "neither a run directory")
    refused(capsys, [runs["llama3"], "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0: expected at least 1")
