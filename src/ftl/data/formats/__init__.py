"""Record formats: one table, FORMATS, from a `data.format` name to the module that turns a row into a record.

A row (its columns already renamed by data.columns) becomes a record of one *kind* — what stages train on:
text, chat, prompt_completion, preference, classification or prompts. TRL's standard and conversational
variants share a kind (a conversational prompt/completion is still prompt_completion); alpaca and sharegpt
are layouts mapped onto a kind. `columns` identify a format for `data.format: auto` (detect.py).

The recipe schema lists the same names and kinds (config.schema.FORMAT_KINDS) without importing this
module; tests/test_registries.py keeps the two in step. Adding a format: its module here and one row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ftl.data.formats import (alpaca, chat, classification, preference, prompt_completion, prompts, sharegpt,
                              text)


def no_variant(row: dict) -> str:
    return ""


@dataclass(frozen=True)
class FormatInfo:
    convert: Callable[[dict], dict]  # row → record; ValueError says what is wrong with the row
    kind: str                        # the kind of record it gives
    columns: tuple[str, ...]         # the columns that identify it (data.format auto)
    optional: tuple[str, ...] = ()   # other columns it reads
    fallback: bool = False           # auto picks it only when no other format fits (a bare text or prompt column)
    describe: Callable[[dict], str] = no_variant  # the variant a row is, for what auto reports ("implicit prompt")


FORMATS: dict[str, FormatInfo] = {
    "text": FormatInfo(text.convert, "text", ("text",), fallback=True),
    "chat": FormatInfo(chat.convert, "chat", ("messages",), ("tools",), describe=chat.describe),
    "prompt_completion": FormatInfo(prompt_completion.convert, "prompt_completion", ("prompt", "completion"),
                                    ("tools",), describe=prompt_completion.describe),
    "preference": FormatInfo(preference.convert, "preference", ("chosen", "rejected"), ("prompt", "tools"),
                             describe=preference.describe),
    "classification": FormatInfo(classification.convert, "classification", ("text", "label")),
    "prompts": FormatInfo(prompts.convert, "prompts", ("prompt",), ("tools",), fallback=True,
                          describe=prompts.describe),
    "alpaca": FormatInfo(alpaca.convert, "prompt_completion", ("instruction", "output"), ("input",)),
    "sharegpt": FormatInfo(sharegpt.convert, "chat", ("conversations",), ("system", "tools")),
}

# every column some format reads: what data.columns may map onto
FIELDS = tuple(dict.fromkeys(c for info in FORMATS.values() for c in info.columns + info.optional))


def describe_formats() -> str:
    """The known formats and their columns, for errors."""
    return "; ".join(f"{name} ({', '.join(info.columns)}{''.join(f' [{o}]' for o in info.optional)})"
                     for name, info in FORMATS.items())
