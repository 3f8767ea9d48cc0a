"""TRL's dataset formats, alpaca and ShareGPT layouts, data.columns and data.format auto: each loads to the
records stages train on, and tokenises with loss only where the model should learn."""

import json

import pytest

from ftl.config.schema import DataConfig
from ftl.data import load_splits
from ftl.data.tokenize import IGNORE, encode_record, generation_prompt, preference_texts, render_response
from ftl.errors import DataError
from ftl.models.tiny import CHATML_TEMPLATE, train_tiny_tokenizer

# ChatML that also renders the tool list and tool calls, as tool-capable templates (Qwen, Llama 3.1) do
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\nTools: ' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message.tool_calls is defined %}{% for call in message.tool_calls %}"
    "{{ '<tool_call>' + (call.function | tojson) + '</tool_call>' }}{% endfor %}{% endif %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}
TOOL_CONVERSATION = [U("weather in Paris?"),
                     {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                         "name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "name": "get_weather", "content": "sunny, 21C"},
                     A("It is sunny in Paris.")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(tmp_path, rows, fmt="auto", **extra):
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = DataConfig.model_validate({"source": {"kind": "jsonl", "path": str(path)}, "format": fmt,
                                     "split": {"validation": 0.0}, **extra})
    return load_splits(cfg)


def records(tmp_path, rows, fmt="auto", **extra):
    return load(tmp_path, rows, fmt, **extra)[0].train


def tokenizer_for(*texts, template=CHATML_TEMPLATE):
    tokenizer = train_tiny_tokenizer(list(texts) * 3 + ["<tool_call> get_weather city Paris"], 400)
    tokenizer.chat_template = template
    return tokenizer


def trained_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t in encoded.labels if t != IGNORE])


# -- each TRL format → records ----------------------------------------------------------------------
def test_conversational_prompt_completion_keeps_both_conversations(tmp_path):
    row = {"prompt": [U("hi"), A("hello"), U("what is 2+2?")], "completion": [A("4")]}
    assert records(tmp_path, [row], "prompt_completion") == [row]


def test_conversational_preference_with_an_explicit_prompt(tmp_path):
    row = {"prompt": [U("sky colour?")], "chosen": [A("blue")], "rejected": [A("green")]}
    assert records(tmp_path, [row], "preference") == [row]


@pytest.mark.parametrize("chosen, rejected", [
    ([U("sky colour?"), A("blue")], [U("sky colour?"), A("green")]),
    ([U("a"), A("b"), U("sky colour?"), A("blue")], [U("a"), A("b"), U("sky colour?"), A("green")]),
    ("Q: sky colour? A: blue", "Q: sky colour? A: green"),
])
def test_implicit_prompt_is_split_off_as_trl_extract_prompt_does(tmp_path, chosen, rejected):
    from trl.data_utils import extract_prompt

    [record] = records(tmp_path, [{"chosen": chosen, "rejected": rejected}], "preference")
    assert record == extract_prompt({"chosen": chosen, "rejected": rejected})


def test_a_string_prompt_beside_conversations_is_extracted_as_trl_does(tmp_path):
    from trl.data_utils import maybe_extract_prompt

    row = {"prompt": "sky colour?", "chosen": [U("sky colour?"), A("blue")], "rejected": [U("sky colour?"), A("no")]}
    [record] = records(tmp_path, [row], "preference")
    assert record == maybe_extract_prompt(dict(row))


def test_conversational_prompt_only(tmp_path):
    row = {"prompt": [{"role": "system", "content": "be brief"}, U("sky colour?")]}
    assert records(tmp_path, [row], "prompts") == [row]


def test_tool_calls_and_tools_column_are_kept_in_canonical_form(tmp_path):
    flat_call = {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]}
    row = {"messages": [U("weather in Paris?"), flat_call, {"role": "tool", "content": "sunny, 21C"},
                        A("It is sunny in Paris.")], "tools": json.dumps([WEATHER_TOOL])}
    [record] = records(tmp_path, [row], "chat")
    assert record["messages"][1] == TOOL_CONVERSATION[1] | {"content": ""}
    assert json.loads(record["tools"]) == [WEATHER_TOOL]


def test_alpaca_appends_a_non_empty_input_to_the_instruction(tmp_path):
    rows = [{"instruction": "Translate to French", "input": "cat", "output": "chat"},
            {"instruction": "Name a colour", "input": "", "output": "blue"}]
    assert records(tmp_path, rows, "alpaca") == [{"prompt": "Translate to French\ncat", "completion": "chat"},
                                                 {"prompt": "Name a colour", "completion": "blue"}]


def test_sharegpt_maps_speakers_to_roles(tmp_path):
    row = {"system": "be kind", "conversations": [
        {"from": "human", "value": "weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": "sunny, 21C"},
        {"from": "gpt", "value": "It is sunny in Paris."}], "tools": json.dumps([WEATHER_TOOL])}
    [record] = records(tmp_path, [row], "sharegpt")
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert record["messages"][2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert record["messages"][4]["content"] == "It is sunny in Paris." and "tools" in record


def test_data_columns_rename_before_the_format_reads(tmp_path):
    rows = [{"question": "sky colour?", "answer": "blue", "id": 1}]
    assert records(tmp_path, rows, "prompt_completion", columns={"prompt": "question", "completion": "answer"}) == \
        [{"prompt": "sky colour?", "completion": "blue"}]
    with pytest.raises(DataError, match=r"d\.jsonl:1: missing column 'answer' \(for completion\) named in data\.columns"):
        records(tmp_path, [{"question": "q"}], "prompt_completion", columns={"prompt": "question", "completion": "answer"})
    with pytest.raises(DataError, match=r"data\.columns\.promt: not a field ftl reads \(fields: text, messages"):
        records(tmp_path, rows, "prompt_completion", columns={"promt": "question"})


# -- data.format auto --------------------------------------------------------------------------------
AUTO = {
    "text": ({"text": "hello"}, "text from columns text"),
    "chat": ({"messages": [U("hi"), A("hello")]}, "chat from columns messages"),
    "chat with tools": ({"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL]}, "chat (with tools) from columns messages, tools"),
    "prompt_completion": ({"prompt": "p", "completion": "c"}, "prompt_completion from columns prompt, completion"),
    "conversational prompt_completion": ({"prompt": [U("p")], "completion": [A("c")]},
                                         "prompt_completion (conversational) from columns prompt, completion"),
    "preference": ({"prompt": "p", "chosen": "a", "rejected": "b"}, "preference from columns chosen, rejected, prompt"),
    "implicit preference": ({"chosen": [U("p"), A("a")], "rejected": [U("p"), A("b")]},
                            "preference (implicit prompt, conversational) from columns chosen, rejected"),
    "classification": ({"text": "good film", "label": 1}, "classification from columns text, label"),
    "prompts": ({"prompt": "p", "source": "web"}, "prompts from columns prompt (ignored: source)"),
    "alpaca": ({"instruction": "i", "input": "", "output": "o", "text": "i o"},
               "alpaca from columns instruction, output, input (ignored: text)"),
    "sharegpt": ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
                 "sharegpt from columns conversations"),
}


@pytest.mark.parametrize("case", list(AUTO))
def test_auto_picks_each_format_and_says_so(tmp_path, case):
    row, said = AUTO[case]
    splits, report = load(tmp_path, [row, row | {}])
    assert report.notes() == [f"ftl: data.format auto -> {said}"]
    assert report.sources[0].format == said.split(" ")[0]
    assert report.as_manifest()["sources"][0]["detected"] == f"data.format auto -> {said}"
    assert splits.train  # and the rows load in that format


def test_auto_after_column_mapping(tmp_path):
    _, report = load(tmp_path, [{"q": "p", "a": "c"}], columns={"prompt": "q", "completion": "a"})
    assert report.notes() == ["ftl: data.format auto -> prompt_completion from columns prompt, completion"]


@pytest.mark.parametrize("row, problem", [
    ({"question": "x", "reply": "y"}, r"columns \[question, reply\] fits none of the formats"),
    ({"prompt": "p", "completion": "c", "chosen": "a", "rejected": "b"},
     r"fits several formats \(prompt_completion, preference\)"),
    ({"prompt": "p", "completion": "c", "label": True}, r"are unpaired preference \(TRL's KTO format\), which ftl "
                                                        r"does not train on"),
])
def test_auto_names_the_columns_and_the_known_formats_when_it_cannot_tell(tmp_path, row, problem):
    with pytest.raises(DataError, match=rf"d\.jsonl:1: data\.format auto: .*{problem}.*Formats known: text \(text\); "
                                        r"chat \(messages \[tools\]\).*sharegpt \(conversations"):
        load(tmp_path, [row])


def test_auto_refuses_rows_that_disagree(tmp_path):
    with pytest.raises(DataError, match=r"rows disagree \(.*d\.jsonl:1 is text, .*d\.jsonl:2 is chat\)"):
        load(tmp_path, [{"text": "x"}, {"messages": [U("hi"), A("hello")]}])


# -- tokenising: assistant-only labels ------------------------------------------------------------------
def test_conversational_prompt_completion_trains_on_the_completion_only():
    tokenizer = tokenizer_for("hi hello what is two and two four")
    record = {"prompt": [U("hi"), A("hello"), U("what is two and two")], "completion": [A("four")]}
    encoded = encode_record(tokenizer, record, 256)
    assert trained_text(tokenizer, encoded).strip() == "four<|im_end|>"  # not the earlier assistant turn
    assert generation_prompt(tokenizer, record) == (
        tokenizer.apply_chat_template(record["prompt"], tokenize=False, add_generation_prompt=True), "four")


def test_tool_calls_and_tools_reach_the_chat_template_and_the_call_is_trained(tmp_path):
    tokenizer = tokenizer_for("weather in Paris sunny it is", template=TOOL_TEMPLATE)
    row = {"messages": TOOL_CONVERSATION, "tools": [WEATHER_TOOL]}
    [record] = records(tmp_path, [row], "chat")
    encoded = encode_record(tokenizer, record, 512)
    rendered = tokenizer.decode(encoded.input_ids)
    assert 'Tools: [{"type": "function", "function": {"name": "get_weather"' in rendered
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in rendered
    trained = trained_text(tokenizer, encoded)
    assert '<tool_call>{"name": "get_weather"' in trained and "It is sunny in Paris." in trained
    assert "sunny, 21C" not in trained and "weather in Paris?" not in trained  # tool result, user: context only
    prompt, _ = generation_prompt(tokenizer, {"prompt": [U("weather in Paris?")], "tools": record["tools"]})
    assert "get_weather" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_a_template_that_drops_tool_calls_is_refused_by_name(tmp_path):
    [record] = records(tmp_path, [{"messages": TOOL_CONVERSATION}], "chat")
    with pytest.raises(DataError, match=r"chat template drops tool calls: 'get_weather' is not in the rendered"):
        encode_record(tokenizer_for("weather"), record, 512)  # the tiny model's plain ChatML


def test_conversational_preference_renders_like_trl(tmp_path):
    from trl.data_utils import apply_chat_template

    tokenizer = tokenizer_for("sky colour blue green")
    [record] = records(tmp_path, [{"chosen": [U("sky colour?"), A("blue")],
                                   "rejected": [U("sky colour?"), A("green")]}], "preference")
    texts = preference_texts(tokenizer, record)
    assert texts == apply_chat_template({k: record[k] for k in ("prompt", "chosen", "rejected")}, tokenizer)
    assert texts["chosen"] == "blue<|im_end|>\n"
    assert render_response(tokenizer, record, "rejected") == texts["prompt"] + texts["rejected"]
