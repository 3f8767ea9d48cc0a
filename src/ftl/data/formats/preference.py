"""data.format preference: `{prompt, chosen, rejected}`, all strings (TRL's standard preference) or all
conversations (conversational), with an optional `tools` column.

Implicit prompt (TRL's `chosen`/`rejected` without `prompt`, or a `prompt` of the other kind, as TRL's
maybe_extract_prompt treats it): the longest shared beginning of chosen and rejected is the prompt, as
trl.extract_prompt splits it (whole messages for conversations; characters for strings, a space before
the split kept with the answers).
"""

from __future__ import annotations

from ftl.data.formats.fields import (answer_messages, is_conversation, messages_field, prompt_messages, text_field,
                                     with_tools)


def convert(row: dict) -> dict:
    conversational = is_conversation(row.get("chosen"))
    if conversational != is_conversation(row.get("rejected")) and row.get("rejected") is not None:
        raise ValueError("chosen and rejected must both be strings or both lists of messages")
    if implicit(row):
        record = split_prompt(row, conversational)
    elif conversational:
        record = {"prompt": prompt_messages(messages_field(row, "prompt", need_assistant=False), "prompt"),
                  "chosen": answer_messages(messages_field(row, "chosen"), "chosen"),
                  "rejected": answer_messages(messages_field(row, "rejected"), "rejected")}
    else:
        record = {name: text_field(row, name) for name in ("prompt", "chosen", "rejected")}
    return with_tools(record, row) if conversational else record


def implicit(row: dict) -> bool:
    prompt = row.get("prompt")
    return prompt is None or is_conversation(prompt) != is_conversation(row.get("chosen"))


def split_prompt(row: dict, conversational: bool) -> dict:
    if conversational:
        chosen, rejected = messages_field(row, "chosen"), messages_field(row, "rejected")
    else:
        chosen, rejected = text_field(row, "chosen"), text_field(row, "rejected")
    shared = next((i for i, (a, b) in enumerate(zip(chosen, rejected)) if a != b), min(len(chosen), len(rejected)))
    if shared == min(len(chosen), len(rejected)):
        raise ValueError("no prompt column, and chosen and rejected do not differ after a shared beginning "
                         "(one is the other, or begins it): give a prompt column")
    if not conversational and shared and chosen[shared - 1] == " ":
        shared -= 1  # the space before the answers stays with them, as in trl.extract_prompt
    prompt = chosen[:shared]
    if not prompt or (not conversational and not prompt.strip()):
        raise ValueError("no prompt column, and chosen and rejected share no beginning to take as the prompt")
    if conversational:
        return {"prompt": prompt_messages(prompt, "the prompt (the turns chosen and rejected share)"),
                "chosen": answer_messages(chosen[shared:], "chosen after the shared prompt"),
                "rejected": answer_messages(rejected[shared:], "rejected after the shared prompt")}
    return {"prompt": prompt, "chosen": chosen[shared:], "rejected": rejected[shared:]}


def describe(row: dict) -> str:
    parts = (["implicit prompt"] if implicit(row) else []) + \
            (["conversational"] if is_conversation(row.get("chosen")) else [])
    return ", ".join(parts)
