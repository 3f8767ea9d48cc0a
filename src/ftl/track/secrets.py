"""Keep API keys and tokens out of everything written to disk or logs."""

from __future__ import annotations

import os
import re

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
SECRET_WORD = re.compile(r"(key|token|secret|password)", re.IGNORECASE)


def secret_values() -> list[str]:
    names = set(SECRET_ENV) | {k for k in os.environ if SECRET_WORD.search(k)}
    return [os.environ[n] for n in names if len(os.environ.get(n, "")) >= 6]


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "***")
    return text


def redact_argv(argv: list[str]) -> list[str]:
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
        elif arg.startswith("--") and SECRET_WORD.search(arg):
            name, eq, _ = arg.partition("=")
            out.append(f"{name}=***" if eq else arg)
            hide_next = not eq
        else:
            out.append(redact(arg))
    return out
