"""What a recipe takes from where it runs: `${VAR}` references to the environment, and relative paths.

A value written `${HF_TOKEN}` stays written that way in every file ftl writes (the resolved recipe, W&B's
config) and is expanded only where it is used: at load for ordinary keys (the loaded recipe remembers the
reference and `resolved_dict` writes it back), at launch for `launch.env` (so a token lives only in the
launched process's environment, and reading a finished run's recipe does not need it).

Path keys resolve against the recipe file's folder — or the working directory when only that one holds the
path (older recipes wrote cwd-relative paths) — with `~` and `$VARS` expanded; dotted overrides resolve
against the working directory. The resolved recipe stores the absolute result.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Optional

from ftl.errors import RecipeError

REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
PATH_VARIABLE = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")  # ${VAR} or $VAR

PATH_KEYS = (("model", "path"), ("data", "source", "path"), ("data", "sources", "*", "path"),
             ("data", "splits", "train", "path"), ("data", "splits", "validation", "path"),
             ("data", "splits", "test", "path"), ("launch", "config_file"), ("launch", "deepspeed"), ("reward", "path"))
NAME_OR_PATH_KEYS = (("data", "chat_template"),)  # a name (llama3) stays as written; a path resolves
LAUNCH_ENV = ("launch", "env")  # expanded when the launch environment is built, never at load
REFERENCES_ATTR = "_env_references"  # on a loaded Recipe: {key path: (as written, as expanded)}

KeyPath = tuple  # keys (and list indices) from the recipe's top


def dotted(keys: KeyPath) -> str:
    return ".".join(str(k) for k in keys)


def has_reference(text: Any) -> bool:
    return isinstance(text, str) and REFERENCE.search(text) is not None


def expand(text: str, where: str, pattern: re.Pattern = REFERENCE) -> str:
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in os.environ:
            raise RecipeError(f"{where}: environment variable {name} is not set (the recipe refers to it "
                              f"as {match.group(0)})")
        return os.environ[name]
    return pattern.sub(value, text)


def expand_references(data: dict, where_of) -> tuple[dict, dict[KeyPath, tuple[str, str]]]:
    """data with every `${VAR}` expanded (launch.env aside), and {key path: (as written, as expanded)}.
    where_of(keys) names the file (and line) for errors."""
    references: dict[KeyPath, tuple[str, str]] = {}

    def walk(node, keys: KeyPath):
        if keys == LAUNCH_ENV:
            return node
        if isinstance(node, dict):
            return {k: walk(v, keys + (k,)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, keys + (i,)) for i, v in enumerate(node)]
        if has_reference(node):
            value = expand(node, f"{where_of(keys)}: {dotted(keys)}")
            references[keys] = (node, value)
            return value
        return node

    return walk(data, ()), references


def restore_references(data: dict, references: dict[KeyPath, tuple[str, str]]) -> dict:
    """data (a dumped recipe) with each expanded reference written back as `${VAR}`, where the value is
    still the expansion (code may have changed a key since load)."""
    out = copy.deepcopy(data)
    for keys, (written, expanded) in references.items():
        parent = out
        for key in keys[:-1]:
            parent = parent[key] if isinstance(parent, (dict, list)) and _holds(parent, key) else None
        # str(): a typed key (a port, say) holds the expansion parsed
        if parent is not None and _holds(parent, keys[-1]) and str(parent[keys[-1]]) == expanded:
            parent[keys[-1]] = written
    return out


def _holds(node, key) -> bool:
    return key in node if isinstance(node, dict) else isinstance(key, int) and key < len(node)


def expand_launch_env(env: dict[str, str], where: str) -> dict[str, str]:
    """launch.env with its references expanded: the environment the launched run gets."""
    return {name: expand(value, f"{where}: launch.env.{name}") for name, value in env.items()}


def resolve_paths(data: dict, where_of, base: Path, fallback: Optional[Path] = None,
                  prefix: KeyPath = ()) -> dict:
    """data (a recipe, a profile body or an override) with every path key absolute. `prefix`: where data
    sits in the file (a profile's keys), for the line in errors."""
    out = copy.deepcopy(data)
    for pattern in PATH_KEYS + NAME_OR_PATH_KEYS:
        for keys, parent in _path_parents(out, pattern):
            value = parent.get(keys[-1])
            if isinstance(value, str) and (pattern in PATH_KEYS or looks_like_path(value)):
                where = f"{where_of(prefix + keys)}: {dotted(keys)}"
                parent[keys[-1]] = absolute_path(parent[keys[-1]], where, base, fallback)
    return out


def looks_like_path(value: str) -> bool:
    """A value with a folder separator, a file suffix or a leading ~ or $ is a path; a bare word is a name."""
    return any(c in value for c in "/\\.") or value.startswith(("~", "$"))


def _path_parents(data: dict, pattern: KeyPath, done: KeyPath = ()):
    """(key path, the dict holding its last key) for each place `pattern` matches; '*' is every list item."""
    if len(pattern) == 1:
        if isinstance(data, dict):
            yield done + pattern, data
        return
    key, rest = pattern[0], pattern[1:]
    if key == "*":
        for index, item in enumerate(data if isinstance(data, list) else []):
            yield from _path_parents(item, rest, done + (index,))
    elif isinstance(data, dict) and key in data:
        yield from _path_parents(data[key], rest, done + (key,))


def absolute_path(text: str, where: str, base: Path, fallback: Optional[Path]) -> str:
    path = os.path.expanduser(expand(text, where, PATH_VARIABLE))
    if os.path.isabs(path):
        return os.path.normpath(path)
    primary = os.path.abspath(os.path.join(base, path))
    if fallback is not None and not os.path.exists(primary):
        other = os.path.abspath(os.path.join(fallback, path))
        if os.path.exists(other):
            return other
    return primary
