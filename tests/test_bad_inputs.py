"""Bad input, as a new user types it: every case exits 2 with one `ftl: error:` line naming the file, key
or line and what was expected, prints no traceback, and removes nothing from an existing run folder.

Cases run in-process through the CLI's `main()` (no interpreter start each), all pointed at one finished
run's folder (with --overwrite where the recipe is the subject, so the folder check does not answer
first): the folder's files must be untouched after every case.
"""

import json
import re
import shutil

import pytest

from conftest import tiny_recipe_dict, write_recipe
from ftl.cli import main
from ftl.run_dir import LOCK_FILE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished tiny run (the folder bad inputs must not touch), its recipe, and a data folder."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    recipe = tiny_recipe_dict(tmp / "run", train={"max_steps": 4, "save_every": 2})
    path = write_recipe(tmp / "good.yaml", recipe)
    with pytest.raises(SystemExit) as done:
        main(["run", str(path)])
    assert done.value.code == 0
    return {"tmp": tmp, "run": tmp / "run", "recipe": recipe, "good": path}


def snapshot(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def refused(capsys, world, argv: list[str], expected: str) -> str:
    before = snapshot(world["run"])
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ftl: error: ")]
    assert len(lines) == 1, err
    assert re.search(expected, err, re.S), f"expected /{expected}/ in:\n{err}"
    assert snapshot(world["run"]) == before, "a refused input changed the run folder"
    return err


def recipe_file(world, name: str, text: str):
    path = world["tmp"] / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def variant(world, name: str, **sections) -> str:
    """The good recipe with sections replaced (None deletes a key)."""
    recipe = json.loads(json.dumps(world["recipe"]))
    for key, value in sections.items():
        if value is None:
            recipe.pop(key, None)
        else:
            recipe[key] = value
    return str(write_recipe(world["tmp"] / f"{name}.yaml", recipe))


def data_file(world, name: str, content: bytes) -> str:
    path = world["tmp"] / name
    path.write_bytes(content)
    return str(path)


# -- recipes: each (name, recipe text or sections, expected) --------------------------------------
RECIPE_TEXT = {
    "not yaml": ("name: t\ntrain: {lr: [\n", r"bad_not yaml\.yaml:\d+: not valid YAML"),
    "a list": ("- name: t\n", r"a recipe is a mapping of keys"),
    "misspelt section": ("name: t\ntrian: {lr: 1}\ndata: {source: {kind: chatterbot}, format: chat}\n",
                         r":2: unknown key 'trian'; did you mean 'train'"),
    "misspelt key": ("name: t\ntrain: {lrr: 1}\ndata: {source: {kind: chatterbot}, format: chat}\n",
                     r":2: unknown key 'train\.lrr'; did you mean 'train\.lr'"),
    "no data": ("name: t\n", r"data: Field required"),
    "batch size a word": ("name: t\ntrain: {batch_size: eight}\ndata: {source: {kind: chatterbot}, format: chat}\n",
                          r":2: train\.batch_size: Input should be a valid integer.*'eight'"),
    "negative lr": ("name: t\ntrain: {lr: -1}\ndata: {source: {kind: chatterbot}, format: chat}\n",
                    r"train\.lr: Input should be greater than 0"),
    "unknown stage": ("name: t\nstage: sftt\ndata: {source: {kind: chatterbot}, format: chat}\n",
                      r"stage: Input should be 'sft', 'reward'"),
    "unknown method": ("name: t\nmethod: {kind: loraa}\ndata: {source: {kind: chatterbot}, format: chat}\n",
                       r"method\.kind: Input should be 'full'"),
    "unknown source kind": ("name: t\ndata: {source: {kind: huggingface}, format: chat}\n", r"data\.source\.kind"),
    "hub dataset without name": ("name: t\ndata: {source: {kind: hub}, format: chat}\n",
                                 r"source kind 'hub' needs a name"),
    "jsonl without path": ("name: t\ndata: {source: {kind: jsonl}, format: chat}\n",
                           r"source kind 'jsonl' needs a path"),
    "splits leave nothing": ("name: t\ndata: {source: {kind: chatterbot}, format: chat, split: {validation: 0.6, "
                             "test: 0.5}}\n", r"validation \+ test must leave some data"),
    "share out of range": ("name: t\ndata: {source: {kind: chatterbot}, format: chat, share: {index: 2, of: 2}}\n",
                           r"share index 2 must be below 'of' \(2\)"),
    "heads do not divide": ("name: t\nmodel: {tiny: {hidden_size: 30}}\ndata: {source: {kind: chatterbot}, "
                            "format: chat}\n", r"hidden_size must be a multiple of num_attention_heads"),
    "reward stage on chat": ("name: t\nstage: reward\ndata: {source: {kind: chatterbot}, format: chat}\n",
                             r"stage 'reward' trains on data\.format 'preference'.*not 'chat'"),
    "classify on chat": ("name: t\nstage: classify\ndata: {source: {kind: chatterbot}, format: chat}\n",
                         r"stage 'classify' trains on data\.format 'classification'"),
    "ppo without reward": ("name: t\nstage: ppo\ndata: {source: {kind: chatterbot}, format: chat}\n",
                           r"stage 'ppo' needs a 'reward' section"),
    "reward model without path": ("name: t\nstage: ppo\nreward: {kind: model}\ndata: {source: {kind: chatterbot}, "
                                  "format: chat}\n", r"reward kind 'model' needs reward\.path"),
    "scratch with lora": ("name: t\nmodel: {init: scratch}\nmethod: {kind: lora}\ndata: {source: {kind: "
                          "chatterbot}, format: chat}\n", r"model\.init 'scratch'.*method\.kind must be 'full'"),
    "qat with lora": ("name: t\nmethod: {kind: lora, qat: {enabled: true}}\ndata: {source: {kind: chatterbot}, "
                      "format: chat}\n", r"method\.qat .*needs method\.kind 'full' and stage 'sft'"),
    "unfreeze phase with steps and epochs": (
        "name: t\ntrain: {unfreeze: [{steps: 2, epochs: 1, lr: 0.1}]}\ndata: {source: {kind: chatterbot}, "
        "format: chat}\n", r"an unfreeze phase needs exactly one of epochs or steps"),
    "old and new reward spelling": ("name: t\nstage: ppo\nppo: {reward: {kind: function, function: 'm:f'}}\n"
                                    "reward: {kind: function, function: 'm:f'}\ndata: {source: {kind: chatterbot}, "
                                    "format: chat}\n", r"both 'ppo\.reward' \(the old spelling\) and 'reward'"),
    "rloo with one sample per prompt": ("name: t\nstage: ppo\nppo: {advantage: rloo}\nreward: {kind: function, "
                                        "function: 'm:f'}\ndata: {source: {kind: chatterbot}, format: prompts}\n",
                                        r"ppo\.samples_per_prompt: advantage 'rloo' .*needs at least 2 \(got 1\)"),
    "kl target from a zero coefficient": ("name: t\nstage: ppo\nppo: {kl_coef: 0, kl_target: 2}\nreward: {kind: "
                                          "function, function: 'm:f'}\ndata: {source: {kind: chatterbot}, format: "
                                          "prompts}\n", r"ppo\.kl_target 2\.0 adapts kl_coef .*needs ppo\.kl_coef "
                                                         r"above 0 as its start \(got 0\)"),
    "profiles not a mapping": ("name: t\nprofiles: [tiny]\ndata: {source: {kind: chatterbot}, format: chat}\n",
                               r"'profiles' must map names to overrides"),
    "training data given twice": ("name: t\ndata: {source: {kind: chatterbot}, sources: [{kind: chatterbot}], "
                                  "format: chat}\n", r"data\.source and data\.sources each give the training data"),
    "a corpus left to format auto": ("name: t\ndata: {source: {kind: chatterbot}}\n",
                                     r"source kind 'chatterbot' builds its rows in the format asked for: set data\.format"),
    "a weight outside data.sources": ("name: t\ndata: {source: {kind: chatterbot, weight: 2}, format: chat}\n",
                                      r"data\.source\.weight: a weight shares the training examples between data\.sources"),
    "some sources weighted, some not": ("name: t\ndata: {format: chat, sources: [{kind: chatterbot, weight: 2}, "
                                        "{kind: chatterbot}]}\n", r"data\.sources\[1\] has no weight while others do"),
    "unknown mix strategy": ("name: t\ndata: {source: {kind: chatterbot}, format: chat, mix: {stopping_strategy: "
                             "longest}}\n", r"data\.mix\.stopping_strategy: Input should be 'first_exhausted' or "
                                             r"'all_exhausted'"),
    "a split share beside a given split": ("name: t\ndata: {source: {kind: chatterbot}, format: chat, split: "
                                           "{test: 0.1}, splits: {test: {kind: chatterbot}}}\n",
                                           r"data\.split\.test \(a share hash-split from train\) and "
                                           r"data\.splits\.test \(a given file\) both set"),
    "unknown chat template": ("name: t\ndata: {source: {kind: chatterbot}, format: chat, chat_template: chatmll}\n",
                              r":2: data\.chat_template: .*unknown chat template 'chatmll': expected a name "
                              r"\(chatml, llama3\) or the path of a Jinja template file"),
    "unknown key in a profile": ("name: t\ndata: {source: {kind: chatterbot}, format: chat}\nprofiles:\n  tiny:\n"
                                 "    trian: {lr: 1}\n", r"unknown key 'profiles\.tiny\.trian'"),
}


@pytest.mark.parametrize("case", list(RECIPE_TEXT))
def test_bad_recipe(capsys, world, case):
    text, expected = RECIPE_TEXT[case]
    refused(capsys, world, ["run", recipe_file(world, "bad_" + case, text), f"track.output_dir={world['run']}",
                            "--overwrite"], expected)


# -- recipes that load but cannot run as written (refused before any model loads) ---------------
def test_missing_recipe_file(capsys, world):
    refused(capsys, world, ["run", str(world["tmp"] / "nope.yaml")], r"nope\.yaml: recipe file not found")


def test_missing_profile(capsys, world):
    refused(capsys, world, ["run", str(world["good"]), "--profile", "gpu9", "--overwrite"],
            r"no profile 'gpu9' \(this recipe has: none\)")


RUNTIME = {
    "two processes started as one": (["launch.num_processes=2"], r"ask for 2 processes .* this run has 1"),
    "ppo with epochs": (["stage=ppo", "reward={kind: function, function: 'ftl.rl.reward_functions:count_substring'}",
                         "train.max_steps=null", "train.epochs=2"], r"train\.epochs: PPO counts iterations"),
    "early stopping in dpo": (["stage=dpo", "data.format=preference", "train.early_stopping.metric=loss"],
                              r"train\.early_stopping\.metric is not available in stage 'dpo'"),
    "data file missing": (["data.source={kind: jsonl, path: /nonexistent/x.jsonl}"],
                          r"data\.source\.path: /nonexistent/x\.jsonl does not exist"),
    "freeze more blocks than exist": (["train.freeze.bottom_layers=9", "train.max_steps=1"],
                                      r"train\.freeze\.bottom_layers=9 but the model has 2 transformer blocks"),
    "freeze pattern matching nothing": (["train.freeze.modules=[nothing.here]", "train.max_steps=1"],
                                        r"train\.freeze\.modules: 'nothing\.here' matches no parameter"),
    "batch larger than the data": (["train.batch_size=100000", "train.max_steps=1"],
                                   r"cannot fill one batch of 100000"),
    "flash attention 2 on packed batches": (["model.attn_implementation=flash_attention_2", "launch.device=cuda"],
                                            r"model\.attn_implementation 'flash_attention_2' keeps packed examples "
                                            r"apart only at train\.batch_size 1"),
    "a chat template that drops tool calls": (
        ["data.source={kind: jsonl, path: TOOLS}", "data.format=chat"],
        r"the tokenizer's chat template drops tool calls: 'get_weather' is not in the rendered conversation"),
    "a chat template file that is missing": (["data.chat_template=/nonexistent/chat.jinja"],
                                             r"data\.chat_template: /nonexistent/chat\.jinja does not exist; expected a "
                                             r"Jinja template file or a name \(chatml, llama3\)"),
    "a chat template that is not Jinja": (["data.chat_template=UNCLOSED"],
                                          r"data\.chat_template: .*unclosed\.jinja is not a valid Jinja template \(line 1"),
    "a chat template that drops the answer": (
        ["data.chat_template=DROPS"], r"data\.chat_template: .*drops\.jinja drops the assistant's answer .*so the "
                                      r"model would train without it"),
    "a chat template that renders the prompt differently once answered": (
        ["data.chat_template=REWRITES"], r"data\.chat_template: .*rewrites\.jinja renders the prompt .* differently "
                                         r"once answered .*assistant-only labels cannot be located"),
    "flash attention 2 on cpu": (["model.attn_implementation=flash_attention_2", "train.batch_size=1"],
                                 r"model\.attn_implementation 'flash_attention_2' runs on CUDA only"),
}


CHAT_TEMPLATES = {  # data.chat_template files that must be refused
    "unclosed": "{% for message in messages %}{{ message['content'] }}",
    "drops": "{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}\n{% endif %}{% endfor %}",
    # a generation prompt the answered exchange does not begin with: labels would land on the wrong tokens
    "rewrites": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'Answer:' }}{% endif %}",
}


@pytest.mark.parametrize("case", list(RUNTIME))
def test_refused_before_training(capsys, world, case, tmp_path):
    """Errors found once the model is built: a fresh folder (an --overwrite that got this far has
    validated its recipe and data, and replaces the old run)."""
    overrides, expected = RUNTIME[case]
    tools = data_file(world, "tools.jsonl", json.dumps({"messages": [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."}]}).encode() + b"\n")
    templates = {name.upper(): data_file(world, f"{name}.jinja", text.encode()) for name, text in CHAT_TEMPLATES.items()}
    overrides = [o.replace("TOOLS", tools) for o in overrides]
    for name, path in templates.items():
        overrides = [o.replace(name, path) for o in overrides]
    refused(capsys, world, ["run", str(world["good"]), f"track.output_dir={tmp_path / 'fresh'}", *overrides],
            expected)


# -- overrides ------------------------------------------------------------------------------------
OVERRIDES = {
    "unknown key": ("train.lrr=1", r"override 'train\.lrr=1': unknown key 'train\.lrr'; did you mean 'train\.lr'"),
    "unknown section": ("trian.lr=1", r"unknown key 'trian'; did you mean 'train'"),
    "bad value": ("train.max_steps=-3", r"train\.max_steps: Input should be greater than 0"),
    "wrong type": ("train.grad_accum=two", r"train\.grad_accum: Input should be a valid integer"),
    "bad literal": ("train.precision=fp8", r"train\.precision: Input should be 'fp32', 'bf16' or 'fp16'"),
    "key under a value": ("name.first=x", r"unknown key|Input should be a valid string"),
    "memory not a size": ("launch.mem=lots", r"launch\.mem: .*expected a Slurm memory size such as 256G"),
}


@pytest.mark.parametrize("case", list(OVERRIDES))
def test_bad_override(capsys, world, case):
    override, expected = OVERRIDES[case]
    refused(capsys, world, ["run", str(world["good"]), "--overwrite", override], expected)


# -- rows in each format --------------------------------------------------------------------------
ROWS = {
    "chat without messages": ("chat", b'{"text": "hi"}\n', r"rows\.jsonl:1: missing field 'messages'"),
    "chat without an assistant turn": ("chat", b'{"messages": [{"role": "user", "content": "hi"}]}\n',
                                       r"rows\.jsonl:1: messages has no assistant turn"),
    "chat with an unknown role": ("chat", b'{"messages": [{"role": "bot", "content": "hi"}]}\n',
                                  r"rows\.jsonl:1: messages\[0\]\.role must be one of"),
    "completion not a string": ("prompt_completion", b'{"prompt": 3, "completion": "x"}\n',
                                r"rows\.jsonl:1: field 'prompt' must be a string, got int"),
    "preference without rejected": ("reward:preference", b'{"prompt": "p", "chosen": "a"}\n',
                                    r"rows\.jsonl:1: missing field 'rejected'"),
    "classification without label": ("classify:classification", b'{"text": "good"}\n', r"rows\.jsonl:1: missing field 'label'"),
    "classification with a float label": ("classify:classification", b'{"text": "good", "label": 0.5}\n',
                                          r"rows\.jsonl:1: field 'label' must be an integer or a string"),
    "empty text": ("text", b'{"text": ""}\n', r"rows\.jsonl:1: field 'text' is empty"),
    "prompts without prompt": ("upft:prompts", b'{"question": "why"}\n', r"rows\.jsonl:1: missing field 'prompt'"),
    "a conversational completion that is not the assistant's": (
        "prompt_completion", b'{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", '
                             b'"content": "x"}]}\n', r"rows\.jsonl:1: completion has no assistant turn to learn from"),
    "a conversational prompt with a string completion": (
        "prompt_completion", b'{"prompt": [{"role": "user", "content": "hi"}], "completion": "x"}\n',
        r"rows\.jsonl:1: prompt and completion must both be strings \(standard\) or both lists of messages"),
    "an implicit prompt with nothing shared": ("reward:preference", b'{"chosen": "yes", "rejected": "no"}\n',
                                               r"rows\.jsonl:1: no prompt column, and chosen and rejected share no "
                                               r"beginning"),
    "a tool call without a name": ("chat", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                           b'"tool_calls": [{"function": {"arguments": {}}}]}]}\n',
                                   r"rows\.jsonl:1: messages\[1\]\.tool_calls\[0\]: missing the function name"),
    "tools that are not a list": ("chat", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", '
                                          b'"content": "yo"}], "tools": 3}\n',
                                  r"rows\.jsonl:1: field 'tools' must be a list of function schemas"),
    "alpaca without output": ("alpaca", b'{"instruction": "x", "input": ""}\n',
                              r"rows\.jsonl:1: missing field 'output' \(format 'alpaca'"),
    "sharegpt with an unknown speaker": ("sharegpt", b'{"conversations": [{"from": "bot", "value": "x"}]}\n',
                                         r"rows\.jsonl:1: conversations\[0\]\.from must be one of human, user, gpt"),
    "auto on columns of no format": ("auto", b'{"question": "x"}\n',
                                     r"rows\.jsonl:1: data\.format auto: a row with columns \[question\] fits none of "
                                     r"the formats.*Formats known: text \(text\); chat"),
    "auto on unpaired preference rows": ("auto", b'{"prompt": "p", "completion": "c", "label": true}\n',
                                         r"rows\.jsonl:1: data\.format auto: .*unpaired preference"),
    "auto finding data the stage does not train on": (
        "reward:auto", b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
        r"data\.source \(jsonl source .*rows\.jsonl\): stage 'reward' trains on data\.format 'preference'.*"
        r"not 'chat'"),
    "a row that is not an object": ("text", b'["a", "b"]\n', r"rows\.jsonl:1: expected an object with fields"),
    "invalid json line": ("text", b'{"text": "ok"}\n{"text": \n', r"rows\.jsonl:2: not valid JSON"),
    "non-utf8 bytes": ("text", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', r"rows\.jsonl:2: .*UTF-8"),
}


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_row(capsys, world, case):
    stage_format, content, expected = ROWS[case]
    stage, _, fmt = stage_format.rpartition(":")
    path = data_file(world, "rows.jsonl", content)
    refused(capsys, world, ["run", str(world["good"]), "--overwrite", f"stage={stage or 'sft'}",
                            f"data.source={{kind: jsonl, path: {path}}}", f"data.format={fmt}"], expected)


DATA_KEYS = {  # (overrides, with FILE: a file of prompt/completion pairs and EMPTY: an empty file; expected)
    "a column data.columns names that the rows lack": (
        ["data.source={kind: jsonl, path: FILE}", "data.format=prompt_completion", "data.columns={prompt: question}"],
        r"pairs\.jsonl:1: missing column 'question' \(for prompt\) named in data\.columns"),
    "data.columns onto a field no format reads": (
        ["data.source={kind: jsonl, path: FILE}", "data.columns={promt: prompt}"],
        r"data\.columns\.promt: not a field ftl reads \(fields: text, messages"),
    "a weighted source that gives nothing": (
        ["data.source=null", "data.format=prompt_completion",
         "data.sources=[{kind: jsonl, path: FILE, weight: 3}, {kind: jsonl, path: EMPTY, weight: 1}]"],
        r"data\.sources\[1\]: no training records from jsonl source .*empty\.jsonl; it holds no rows"),
    "a given split file that is missing": (
        ["data.split.validation=0", "data.splits={validation: {kind: jsonl, path: /nonexistent/v.jsonl}}"],
        r"data\.splits\.validation\.path: /nonexistent/v\.jsonl does not exist"),
}


@pytest.mark.parametrize("case", list(DATA_KEYS))
def test_bad_data_keys(capsys, world, case):
    overrides, expected = DATA_KEYS[case]
    files = {"FILE": data_file(world, "pairs.jsonl", b'{"prompt": "p", "completion": "c"}\n' * 3),
             "EMPTY": data_file(world, "empty.jsonl", b"")}
    for name, path in files.items():
        overrides = [o.replace(name, path) for o in overrides]
    refused(capsys, world, ["run", str(world["good"]), "--overwrite", *overrides], expected)


def test_data_path_that_is_a_directory(capsys, world):
    refused(capsys, world, ["run", str(world["good"]), "--overwrite",
                            f"data.source={{kind: jsonl, path: {world['tmp']}}}"], r"data\.source\.path: .*(directory|folder)")


def test_json_file_that_is_not_a_list(capsys, world):
    path = data_file(world, "rows.json", b'{"text": "x"}')
    refused(capsys, world, ["run", str(world["good"]), "--overwrite", f"data.source={{kind: json, path: {path}}}",
                            "data.format=text"], r"rows\.json: expected a JSON list of rows")


def test_every_row_rejected_shows_reasons_and_lines(capsys, world):
    path = data_file(world, "rows.jsonl", b'{"text": ""}\n{"txt": "a"}\n{"text": ""}\n')
    refused(capsys, world, ["run", str(world["good"]), "--overwrite", f"data.source={{kind: jsonl, path: {path}}}",
                            "data.format=text", "data.on_bad_row=skip"], r"rows\.jsonl:1: field 'text' is empty")


# -- command-line arguments -----------------------------------------------------------------------
CLI = {
    "no command": ([], r"ftl: error: the following arguments are required: command"),
    "unknown command": (["trian"], r"invalid choice: 'trian'"),
    "run without a recipe": (["run"], r"run: the following arguments are required: recipe"),
    "unknown flag": (["run", "x.yaml", "--resum"], r"unrecognized arguments: --resum"),
    "resume and overwrite": (["run", "GOOD", "--resume", "--overwrite"], r"--resume continues .* choose one"),
    "machine rank without main ip": (["launch", "GOOD", "--machine-rank", "1"], r"--machine-rank and --main-ip go together"),
    "pipeline dry run without slurm": (["pipeline", "x.yaml", "--dry-run"], r"--dry-run goes with --slurm"),
    "eval on an empty folder": (["eval", "TMP"], r"neither a run directory .* nor a model folder"),
    "merge a full fine-tune": (["merge", "RUN"], r"method 'full' has nothing to merge"),
    "merge a folder without a run": (["merge", "TMP"], r"empty: not a run directory \(no recipe\.yaml\)"),
    "eval format typo": (["eval", "RUN", "--data", "DATA", "--format", "chta"], r"(format|chta)"),
    "eval a language model on preference rows": (
        ["eval", "RUN", "--data", "DATA", "--format", "preference"],
        r"--data \S+eval\.jsonl: \S+ holds a language model \(stage 'sft'\); it scores text, chat, "
        r"prompt_completion .* rows, not 'preference'"),
    "eval a language model on classification rows": (
        ["eval", "RUN", "--data", "DATA", "--format", "classification"],
        r"holds a language model .* not 'classification'"),
    "eval a model folder without data": (["eval", "FINAL"],
                                         r"is a language-model folder: give --data FILE and --format"),
    "eval a split the run does not have": (["eval", "RUN", "--split", "test"],
                                           r"the run's test split is empty \(data\.split\.test: 0\.0\)"),
    "dtype typo": (["merge", "RUN", "--dtype", "fp8"], r"argument --dtype: invalid choice: 'fp8'"),
    "no cores for the job": (["slurm", "submit", "GOOD", "--cpus-per-task", "0", "--dry-run"],
                             r"--cpus-per-task: expected a whole number above 0, got 0"),
    "job memory not a size": (["slurm", "submit", "GOOD", "--mem", "lots", "--dry-run"],
                              r"--mem: expected a Slurm memory size such as 256G or 65536M, got 'lots'"),
}


@pytest.mark.parametrize("case", list(CLI))
def test_bad_command_line(capsys, world, case):
    argv, expected = CLI[case]
    empty = world["tmp"] / "empty"
    empty.mkdir(exist_ok=True)
    data = data_file(world, "eval.jsonl", b'{"text": "hello there"}\n')
    names = {"GOOD": str(world["good"]), "RUN": str(world["run"]), "TMP": str(empty), "DATA": data,
             "FINAL": str(world["run"] / "final")}
    refused(capsys, world, [names.get(a, a) for a in argv], expected)


# -- damaged or occupied run folders --------------------------------------------------------------
def test_rerun_into_a_finished_run_without_overwrite(capsys, world):
    refused(capsys, world, ["run", str(world["good"])], r"holds a finished run .* --overwrite")


def test_resume_with_a_changed_learning_rate(capsys, world):
    refused(capsys, world, ["run", str(world["good"]), "--resume", "train.lr=0.5"], r"train\.lr: 0\.01 → 0\.5")


def test_resume_past_the_end(capsys, world):
    refused(capsys, world, ["run", str(world["good"]), "--resume", "train.max_steps=1"], r"past the end of this recipe")


def test_resume_without_a_contract(capsys, world, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(world["run"], run)
    (run / "resume_contract.json").unlink()
    recipe = variant(world, "old", track={"output_dir": str(run), "plot": True})
    before = snapshot(run)
    with pytest.raises(SystemExit) as exit_info:
        main(["run", recipe, "--resume"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "resume_contract.json is missing" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_a_live_lock(capsys, world):
    import os
    import socket

    lock = world["run"] / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "then"}))
    try:
        refused(capsys, world, ["run", str(world["good"]), "--overwrite"], r"another run is using this folder")
    finally:
        lock.unlink()


def test_resume_when_every_checkpoint_is_damaged(capsys, world, tmp_path):
    run = tmp_path / "damaged"
    shutil.copytree(world["run"], run)
    for marker in (run / "checkpoints").glob("step-*/COMPLETE"):
        marker.unlink()
    recipe = variant(world, "damaged", track={"output_dir": str(run), "plot": True})
    with pytest.raises(SystemExit) as exit_info:
        main(["run", recipe, "--resume"])
    err = capsys.readouterr()
    assert exit_info.value.code == 2 and "nothing to resume" in err.err and "Traceback" not in err.err
    assert err.out.count("incomplete or damaged (no COMPLETE marker") == 2
