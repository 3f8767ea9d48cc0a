"""Which recipe values are secrets, and the secret values of the recipes loaded in this process: every file
ftl (or W&B) writes and every command it prints shows REDACTED instead (a value only in the recipe is not
in this process's environment, where `ftl.track.secrets` finds the others)."""

from __future__ import annotations

import re
from typing import Any

from ftl.config.environment import KeyPath, has_reference

# environment variable and argument names (broad: hiding one value too many costs nothing)
SECRET_WORD = re.compile(r"(key|token|secret|password)", re.IGNORECASE)
# other recipe keys: the whole word (api_key, hf_token), not inside another (max_new_tokens, tokenizer_class),
# since a value hidden by mistake would be lost from the resolved recipe
SECRET_KEY = re.compile(r"(?:^|[^a-z])(?:key|token|secret|password|passwd)(?:$|[^a-z])", re.IGNORECASE)
# values shaped like well-known tokens, whatever their key
SECRET_SHAPE = re.compile(r"\b(?:hf_|sk-|ghp_|github_pat_|xox[abp]-)[A-Za-z0-9_\-]{16,}")
REDACTED = "***"
MIN_LENGTH = 6  # a shorter value would be replaced inside unrelated text

_remembered: set[str] = set()


def is_secret(keys: KeyPath, value: Any) -> bool:
    """keys: the value's key path in the recipe. A `${VAR}` reference is no secret: it holds no value."""
    if not isinstance(value, str) or not value or has_reference(value):
        return False
    name = str(keys[-1]) if keys else ""
    env_entry = len(keys) == 3 and tuple(keys[:2]) == ("launch", "env")
    return bool((SECRET_WORD if env_entry else SECRET_KEY).search(name) or SECRET_SHAPE.search(value))


def remember_secrets(data: Any, keys: KeyPath = ()) -> None:
    """Note the secrets of a loaded recipe, so hide() replaces them wherever they appear."""
    for inner, value in _children(data, keys):
        remember_secrets(value, inner)
    if is_secret(keys, data) and len(data) >= MIN_LENGTH:
        _remembered.add(data)


def remembered_secrets() -> set[str]:
    return set(_remembered)


def hide(text: str) -> str:
    for value in sorted(_remembered, key=len, reverse=True):  # a longer secret may contain a shorter one
        text = text.replace(value, REDACTED)
    return text


def redact_tree(data: Any, keys: KeyPath = ()) -> Any:
    """A copy of a recipe (or any config dict) with every secret value REDACTED."""
    if isinstance(data, dict):
        return {k: redact_tree(v, keys + (k,)) for k, v in data.items()}
    if isinstance(data, list):
        return [redact_tree(v, keys + (i,)) for i, v in enumerate(data)]
    if is_secret(keys, data):
        return REDACTED
    return hide(data) if isinstance(data, str) else data


def redact_override(arg: str) -> str:
    """`launch.env.HF_TOKEN=hf_...` → `launch.env.HF_TOKEN=***`; other arguments unchanged."""
    dotted, eq, value = arg.partition("=")
    if eq and not dotted.startswith("-") and is_secret(tuple(dotted.strip().split(".")), value):
        return f"{dotted}={REDACTED}"
    return arg


def _children(data: Any, keys: KeyPath):
    if isinstance(data, dict):
        return [(keys + (k,), v) for k, v in data.items()]
    if isinstance(data, list):
        return [(keys + (i,), v) for i, v in enumerate(data)]
    return []
