"""data.format sharegpt: `{conversations: [{from, value}]}` → chat messages (TRL's maybe_convert_to_chatml
renames the same keys). Speakers: human/user → user, gpt/assistant → assistant, system → system,
observation/tool → tool, function_call → an assistant turn calling the tool its value names (a JSON
{name, arguments}, as in LLaMA-Factory's ShareGPT). An optional `system` column opens the conversation and
a `tools` column lists the functions."""

from __future__ import annotations

import json

from ftl.data.formats.chat import convert as chat_record

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "observation": "tool", "tool": "tool", "function_call": "assistant"}


def convert(row: dict) -> dict:
    turns = row.get("conversations")
    if turns is None:
        raise ValueError("missing field 'conversations'")
    if not isinstance(turns, list) or not turns:
        raise ValueError("field 'conversations' must be a non-empty list of {from, value}")
    messages = [message(turn, f"conversations[{i}]") for i, turn in enumerate(turns)]
    system = row.get("system")
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return chat_record({"messages": messages, "tools": row.get("tools")})


def message(turn, where: str) -> dict:
    if not isinstance(turn, dict):
        raise ValueError(f"{where} must be an object with from and value")
    speaker, value = turn.get("from", turn.get("role")), turn.get("value", turn.get("content"))
    if speaker not in ROLES:
        raise ValueError(f"{where}.from must be one of {', '.join(ROLES)}, got {speaker!r}")
    if speaker != "function_call":
        if not isinstance(value, str) or (not value.strip() and ROLES[speaker] != "tool"):
            raise ValueError(f"{where}.value must be a non-empty string")
        return {"role": ROLES[speaker], "content": value}
    try:
        call = json.loads(value) if isinstance(value, str) else value
    except json.JSONDecodeError:
        raise ValueError(f"{where}: a function_call's value must be JSON {{name, arguments}}") from None
    calls = call if isinstance(call, list) else [call]
    return {"role": "assistant", "content": None, "tool_calls": calls}
