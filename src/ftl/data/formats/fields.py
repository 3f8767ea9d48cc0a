"""Checks shared by the record formats: a text field, a conversation (TRL's messages, tool calls included)
and a `tools` column. Each returns the value in canonical form or raises ValueError saying what is wrong;
validation turns that into an error naming the row's file and line.

Canonical messages hold `role` and `content` (a string, "" for an assistant turn that only calls tools),
plus `tool_calls` on assistant turns ({type: function, function: {name, arguments}}, arguments an object)
and `tool_call_id` / `name` on tool turns: the shapes chat templates read. A `tools` column is kept as
one JSON string (what TRL and `datasets` store, since tool schemas differ from row to row); it is parsed
again only to be handed to the chat template.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


def text_field(row: dict, name: str) -> str:
    if name not in row or row[name] is None:
        raise ValueError(f"missing field '{name}'")
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{name}' is empty")
    return value


def is_conversation(value: Any) -> bool:
    """TRL's test (is_conversational): a list whose first item is a message with a role."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def messages_field(row: dict, name: str, need_assistant: bool = True) -> list[dict]:
    if name not in row or row[name] is None:
        raise ValueError(f"missing field '{name}'")
    value = row[name]
    if not isinstance(value, list) or not value:
        raise ValueError(f"field '{name}' must be a non-empty list of {{role, content}}")
    messages = [message(m, f"{name}[{i}]") for i, m in enumerate(value)]
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{name} has no assistant turn to learn from")
    return messages


def message(msg: Any, where: str) -> dict:
    if not isinstance(msg, dict):
        raise ValueError(f"{where} must be an object with role and content")
    role = msg.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of {ROLES}, got {role!r}")
    out = {"role": role}
    calls = msg.get("tool_calls")
    if calls is not None:
        if role != "assistant":
            raise ValueError(f"{where}: only an assistant turn makes tool_calls (this one is '{role}')")
        if not isinstance(calls, list) or not calls:
            raise ValueError(f"{where}.tool_calls must be a non-empty list")
        out["tool_calls"] = [tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    content = msg.get("content")
    if content is None and "tool_calls" in out:
        content = ""  # a turn that only calls tools
    if not isinstance(content, str) or (not content.strip() and role != "tool" and "tool_calls" not in out):
        raise ValueError(f"{where}.content must be a non-empty string")
    out["content"] = content
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if isinstance(msg.get(key), str):
                out[key] = msg[key]
    return out


def tool_call(call: Any, where: str) -> dict:
    """OpenAI's shape {type, function: {name, arguments}}; a flat {name, arguments} is accepted too."""
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object {{type: function, function: {{name, arguments}}}}")
    function = call.get("function", call)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: missing the function name (function.name)")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):  # some datasets store the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            arguments = None
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}.function.arguments must be an object (or a JSON object string)")
    out = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def tools_field(row: dict) -> str | None:
    """The `tools` column (a list of function schemas, or a JSON string of one) as a JSON string; None if absent."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as err:
            raise ValueError(f"field 'tools' is a string but not JSON ({err.msg})") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("field 'tools' must be a list of function schemas ({type: function, function: {name, "
                         "description, parameters}})")
    for i, tool in enumerate(tools):
        function = tool.get("function", tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ValueError(f"tools[{i}]: missing the function name (function.name)")
    return json.dumps(tools, ensure_ascii=False)


def with_tools(record: dict, row: dict) -> dict:
    tools = tools_field(row)
    return {**record, "tools": tools} if tools else record


def prompt_messages(messages: list[dict], name: str) -> list[dict]:
    """A conversational prompt ends where the model answers: after a user or tool turn."""
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError(f"{name} must end with a user or tool turn (the answer follows it), not "
                         f"'{messages[-1]['role']}'")
    return messages


def answer_messages(messages: list[dict], name: str) -> list[dict]:
    """A conversational completion / chosen / rejected: the assistant's turn(s), tool results between them."""
    if messages[0]["role"] != "assistant" or any(m["role"] not in ("assistant", "tool") for m in messages):
        raise ValueError(f"{name} must be the assistant's turn(s) (roles assistant, tool), starting with assistant")
    return messages
