"""data.format prompts: prompts alone, for stages that sample their own answers (ppo, grpo, upft).
`prompt` is a string (TRL's standard prompt-only) or a list of messages ending with a user or tool turn
(conversational prompt-only), with an optional `tools` column."""

from __future__ import annotations

from ftl.data.formats.fields import is_conversation, messages_field, prompt_messages, text_field, with_tools


def convert(row: dict) -> dict:
    if is_conversation(row.get("prompt")):
        prompt = prompt_messages(messages_field(row, "prompt", need_assistant=False), "prompt")
        return with_tools({"prompt": prompt}, row)
    return {"prompt": text_field(row, "prompt")}


def describe(row: dict) -> str:
    return "conversational" if is_conversation(row.get("prompt")) else ""
