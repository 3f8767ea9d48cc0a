"""Conversations through the tokenizer's chat template: tools and tool calls included, and the split of a
rendered exchange into the prompt (ready for generation) and the answer, as TRL's apply_chat_template
splits it (the longest shared beginning of the prompt-with-generation-prompt and the whole exchange).

A record keeps its `tools` column as a JSON string (formats/fields.py); here it becomes the list of
function schemas `apply_chat_template(..., tools=...)` takes. A template that silently drops tool calls
or the tool list would train on conversations without them: that is refused by name.
"""

from __future__ import annotations

import json
from itertools import takewhile
from typing import Optional

from ftl.errors import DataError


def tools_of(record: dict) -> Optional[list[dict]]:
    return json.loads(record["tools"]) if record.get("tools") else None


def with_system(messages: list[dict], system_prompt: Optional[str]) -> list[dict]:
    if system_prompt and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def render(tokenizer, messages: list[dict], tools: Optional[list[dict]] = None, generation: bool = False) -> str:
    if not tokenizer.chat_template:
        raise DataError("conversational records need a tokenizer with a chat template; this one has none")
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=generation)
    check_tools_rendered(text, messages, tools)
    return text


def check_tools_rendered(text: str, messages: list[dict], tools: Optional[list[dict]]) -> None:
    """Every tool call's function name and every listed tool's name must appear in the rendered text."""
    names = [c["function"]["name"] for m in messages for c in m.get("tool_calls", ())]
    listed = [t.get("function", t).get("name") for t in tools or ()]
    missing = [name for name in names + listed if name and name not in text]
    if missing:
        what = "tool calls" if missing[0] in names else "the tools list"
        raise DataError(f"the tokenizer's chat template drops {what}: '{missing[0]}' is not in the rendered "
                        "conversation, so the model would train without it; use a model (or chat template) that "
                        "renders tools and tool_calls")


def split_exchange(tokenizer, prompt: list[dict], answers: list[list[dict]],
                   tools: Optional[list[dict]] = None) -> tuple[str, list[str]]:
    """(prompt text ready for generation, each answer as the template continues the prompt with it)."""
    prompt_text = render(tokenizer, prompt, tools, generation=True)
    full = [render(tokenizer, prompt + answer, tools) for answer in answers]
    for text in full:  # some templates render the generation prompt differently from a finished turn
        prompt_text = "".join(a for a, _ in takewhile(lambda pair: pair[0] == pair[1], zip(prompt_text, text)))
    return prompt_text, [text[len(prompt_text):] for text in full]
