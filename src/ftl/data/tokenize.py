"""Records → token features {input_ids, labels}, with loss only where the model should learn.

Chat: loss on assistant turns only, found from the chat template's own rendering (works with any
template, no `{% generation %}` tags needed); each assistant turn keeps its end-of-turn token so the
model learns to stop. A conversational prompt/completion trains on the completion's assistant turns only.
Tools and tool calls are rendered by the template (conversation.py). Text and prompt/completion end with EOS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from ftl.data.conversation import render, split_exchange, tools_of, with_system
from ftl.data.records import record_kind
from ftl.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False  # was longer than data.max_length and cut

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


def cut(ids: list[int], labels: list[int], max_length: int) -> Encoded:
    return Encoded(ids[:max_length], labels[:max_length], truncated=len(ids) > max_length)


@dataclass
class EncodeReport:
    """What encoding did to one split's examples, for the manifest (`as_dict` keys go into data)."""
    encoded: int = 0
    truncated: int = 0  # cut at data.max_length (kept, unless nothing to learn was left)
    dropped_nothing_to_learn: int = 0  # no trained token (e.g. cut before the answer)

    def as_dict(self) -> dict:
        return asdict(self)


def encode_chat(tokenizer, messages: list[dict], max_length: int, tools: Optional[list[dict]] = None,
                trained_from: int = 0) -> Encoded:
    """Loss on the assistant turns from message `trained_from` on (0: every assistant turn)."""
    full = render(tokenizer, messages, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < trained_from:
            continue
        before = render(tokenizer, messages[:i], tools, generation=True)
        through = render(tokenizer, messages[: i + 1], tools)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError("the tokenizer's chat template does not render conversations as growing "
                            "prefixes; assistant-only loss cannot be located: set data.chat_template to one "
                            "that does (a name such as chatml or llama3, or a Jinja file)")
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if _inside(start, spans) else IGNORE
              for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])]
    return cut(enc["input_ids"], labels, max_length)


def _inside(position: int, spans) -> bool:
    return any(start <= position < end for start, end in spans)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> Encoded:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return cut(ids, labels, max_length)


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return cut(ids, list(ids), max_length)


def encode_record(tokenizer, record: dict, max_length: int, system_prompt: Optional[str] = None) -> Encoded:
    """A record of any language-model kind (records from mixed sources may differ in kind)."""
    kind = record_kind(record)
    if kind == "chat":
        return encode_chat(tokenizer, with_system(record["messages"], system_prompt), max_length, tools_of(record))
    if kind == "prompt_completion" and isinstance(record["prompt"], list):
        prompt = with_system(record["prompt"], system_prompt)
        return encode_chat(tokenizer, prompt + record["completion"], max_length, tools_of(record),
                           trained_from=len(prompt))
    if kind == "prompt_completion":
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
            return encode_chat(tokenizer, with_system(messages, system_prompt), max_length)
        return encode_prompt_completion(tokenizer, record["prompt"], record["completion"], max_length)
    if kind == "text":
        return encode_text(tokenizer, record["text"], max_length)
    raise DataError(f"{kind} records cannot be used for language-model training")


def encode_records(tokenizer, records: list[dict], data, report: EncodeReport | None = None) -> list[dict]:
    """Features under a DataConfig's max_length and system prompt; examples with nothing to learn (e.g.
    truncated before the answer) dropped. `report`, when given, counts the truncated and the dropped."""
    encoded = [encode_record(tokenizer, r, data.max_length, data.system_prompt) for r in records]
    features = [e.as_dict() for e in encoded if any(t != IGNORE for t in e.labels[1:])]
    if report is not None:
        report.encoded += len(encoded)
        report.truncated += sum(e.truncated for e in encoded)
        report.dropped_nothing_to_learn += len(encoded) - len(features)
    return features


def render_pair(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> str:
    """A prompt and one response as the model sees a finished exchange (chat template when it has one)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False)
    return f"{prompt}\n{response}{tokenizer.eos_token}"


def render_response(tokenizer, record: dict, response: str, system_prompt: str | None = None) -> str:
    """A preference record's prompt and its `response` ('chosen' or 'rejected') as one finished exchange."""
    if isinstance(record["prompt"], list):
        return render(tokenizer, with_system(record["prompt"], system_prompt) + record[response], tools_of(record))
    return render_pair(tokenizer, record["prompt"], record[response], system_prompt)


def preference_texts(tokenizer, record: dict, system_prompt: str | None = None) -> dict:
    """{prompt, chosen, rejected} as text for a preference trainer: the prompt ready for generation, each
    answer as the policy should continue it (ending with EOS / the end of its turn)."""
    if isinstance(record["prompt"], list):
        prompt, (chosen, rejected) = split_exchange(tokenizer, with_system(record["prompt"], system_prompt),
                                                    [record["chosen"], record["rejected"]], tools_of(record))
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    eos = tokenizer.eos_token
    return {"prompt": generation_prompt(tokenizer, record, system_prompt)[0],
            "chosen": record["chosen"] + eos, "rejected": record["rejected"] + eos}


def generation_prompt(tokenizer, record: dict, system_prompt: str | None = None) -> tuple[str, str | None]:
    """(prompt text ready for generation, reference answer) for a record."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context, reference = messages[:last], messages[last]["content"]
    elif isinstance(record.get("prompt"), list):  # conversational prompt (and completion)
        context = record["prompt"]
        answer = record.get("completion") or []
        reference = next((m["content"] for m in answer if m["role"] == "assistant" and m["content"]), None)
    elif "prompt" in record:
        context, reference = [{"role": "user", "content": record["prompt"]}], record.get("completion")
    else:
        return record["text"][:200], None
    if tokenizer.chat_template:
        return render(tokenizer, with_system(context, system_prompt), tools_of(record), generation=True), reference
    return context[-1]["content"], reference


def count_trained_tokens(features: list[dict]) -> int:
    return sum(sum(1 for t in f["labels"][1:] if t != IGNORE) for f in features)
