"""Keep API keys and tokens out of everything written to disk or logs: the secret values of this process's
environment and of the recipes it loaded (ftl.config.secret_keys) are replaced by '***'."""

from __future__ import annotations

import os

from ftl.config.secret_keys import SECRET_WORD, MIN_LENGTH, REDACTED, redact_override, remembered_secrets

SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")


def secret_values() -> list[str]:
    names = set(SECRET_ENV) | {k for k in os.environ if SECRET_WORD.search(k)}
    from_env = {os.environ[n] for n in names if len(os.environ.get(n, "")) >= MIN_LENGTH}
    # longest first: a secret that contains another is replaced whole
    return sorted(from_env | remembered_secrets(), key=len, reverse=True)


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, REDACTED)
    return text


def redact_argv(argv: list[str]) -> list[str]:
    out, hide_next = [], False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
        elif arg.startswith("--") and SECRET_WORD.search(arg):
            name, eq, _ = arg.partition("=")
            out.append(f"{name}={REDACTED}" if eq else arg)
            hide_next = not eq
        else:
            out.append(redact(redact_override(arg)))
    return out
