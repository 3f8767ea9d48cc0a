"""data.format prompt_completion: `{prompt, completion}`, both strings (TRL's standard prompt-completion) or
both lists of messages (conversational: the prompt ends with a user or tool turn, the completion is the
assistant's), with an optional `tools` column. Loss on the completion only."""

from __future__ import annotations

from ftl.data.formats.fields import (answer_messages, is_conversation, messages_field, prompt_messages, text_field,
                                     with_tools)


def convert(row: dict) -> dict:
    prompt_is, completion_is = is_conversation(row.get("prompt")), is_conversation(row.get("completion"))
    if prompt_is != completion_is and row.get("prompt") is not None and row.get("completion") is not None:
        raise ValueError("prompt and completion must both be strings (standard) or both lists of messages "
                         "(conversational)")
    if prompt_is or completion_is:
        prompt = prompt_messages(messages_field(row, "prompt", need_assistant=False), "prompt")
        completion = answer_messages(messages_field(row, "completion"), "completion")
        return with_tools({"prompt": prompt, "completion": completion}, row)
    return {"prompt": text_field(row, "prompt"), "completion": text_field(row, "completion")}


def describe(row: dict) -> str:
    return "conversational" if is_conversation(row.get("prompt")) else ""
