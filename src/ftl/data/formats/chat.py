"""data.format chat: `{messages}`, a conversation (TRL's conversational language modeling). Loss on every
assistant turn. Tool use: assistant turns may carry `tool_calls`, `tool` turns return results, and a `tools`
column lists the functions; all three reach the chat template."""

from __future__ import annotations

from ftl.data.formats.fields import messages_field, with_tools


def convert(row: dict) -> dict:
    return with_tools({"messages": messages_field(row, "messages")}, row)


def describe(row: dict) -> str:
    messages = row.get("messages") if isinstance(row.get("messages"), list) else []
    calls = any(isinstance(m, dict) and m.get("tool_calls") for m in messages)
    return "with tools" if row.get("tools") or calls else ""
