"""Records → token features {input_ids, labels}, with loss only where the model should learn.

Chat: loss on assistant turns only, found from the chat template's own rendering (works with any
template, no `{% generation %}` tags needed); each assistant turn keeps its end-of-turn token so the
model learns to stop. Text and prompt/completion end with EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftl.errors import DataError

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    def as_dict(self) -> dict:
        return {"input_ids": self.input_ids, "labels": self.labels}


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def encode_chat(tokenizer, messages: list[dict], max_length: int) -> Encoded:
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = render(messages[:i], gen=True), render(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError("the tokenizer's chat template does not render conversations as growing "
                            "prefixes; assistant-only loss cannot be located")
        spans.append((len(before), len(through)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [tok if _inside(start, spans) else IGNORE
              for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])]
    return Encoded(enc["input_ids"][:max_length], labels[:max_length])


def _inside(position: int, spans) -> bool:
    return any(start <= position < end for start, end in spans)


def encode_prompt_completion(tokenizer, prompt: str, completion: str, max_length: int) -> Encoded:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = prompt_ids + completion_ids
    labels = [IGNORE] * len(prompt_ids) + completion_ids
    return Encoded(ids[:max_length], labels[:max_length])


def encode_text(tokenizer, text: str, max_length: int) -> Encoded:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = ids[:max_length]
    return Encoded(ids, list(ids))


def encode_record(tokenizer, record: dict, fmt: str, max_length: int, system_prompt: str | None = None) -> Encoded:
    if fmt == "chat":
        return encode_chat(tokenizer, with_system(record["messages"], system_prompt), max_length)
    if fmt == "prompt_completion":
        if tokenizer.chat_template:
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
            return encode_chat(tokenizer, with_system(messages, system_prompt), max_length)
        return encode_prompt_completion(tokenizer, record["prompt"], record["completion"], max_length)
    if fmt == "text":
        return encode_text(tokenizer, record["text"], max_length)
    raise DataError(f"data.format '{fmt}' cannot be used for language-model training")


def encode_records(tokenizer, records: list[dict], data) -> list[dict]:
    """Features for a DataConfig's format; examples with nothing to learn (e.g. truncated before the
    answer) dropped."""
    features = [encode_record(tokenizer, r, data.format, data.max_length, data.system_prompt).as_dict()
                for r in records]
    return [f for f in features if any(t != IGNORE for t in f["labels"][1:])]


def render_pair(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> str:
    """A prompt and one response as the model sees a finished exchange (chat template when it has one)."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        return tokenizer.apply_chat_template(with_system(messages, system_prompt), tokenize=False)
    return f"{prompt}\n{response}{tokenizer.eos_token}"


def generation_prompt(tokenizer, record: dict, system_prompt: str | None = None) -> tuple[str, str | None]:
    """(prompt text ready for generation, reference answer) for a record."""
    if "messages" in record:
        messages = record["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        context, reference = messages[:last], messages[last]["content"]
    elif "prompt" in record:
        context, reference = [{"role": "user", "content": record["prompt"]}], record.get("completion")
    else:
        return record["text"][:200], None
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(with_system(context, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
        return text, reference
    return context[-1]["content"], reference


def count_trained_tokens(features: list[dict]) -> int:
    return sum(sum(1 for t in f["labels"][1:] if t != IGNORE) for f in features)
