"""data.format alpaca: `{instruction, input, output}` → prompt/completion. The prompt is the instruction,
followed by the input on a new line when the input is not empty (as LLaMA-Factory joins them)."""

from __future__ import annotations

from ftl.data.formats.fields import text_field


def convert(row: dict) -> dict:
    prompt = text_field(row, "instruction")
    extra = row.get("input")
    if extra is not None and not isinstance(extra, str):
        raise ValueError(f"field 'input' must be a string, got {type(extra).__name__}")
    if extra and extra.strip():
        prompt = f"{prompt}\n{extra}"
    return {"prompt": prompt, "completion": text_field(row, "output")}
