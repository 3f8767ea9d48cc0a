"""Load a recipe: YAML → profile merged → dotted overrides → typed, validated `Recipe`.

Every error names the file, the key path (and its line when it is in the file) and what was expected.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ValidationError

from ftl.config.environment import (REFERENCES_ATTR, dotted, expand_references, resolve_paths,
                                   restore_references)
from ftl.config.legacy import upgrade_override, upgrade_recipe
from ftl.config.schema import Recipe
from ftl.config.secret_keys import redact_tree, remember_secrets
from ftl.errors import RecipeError


def load_recipe(path: str | Path, profile: Optional[str] = None, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    text = path.read_text()
    try:
        raw = yaml.safe_load(text)
        lines = _key_lines(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise RecipeError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys (name, stage, model, data, ...)")
    raw, lines = upgrade_recipe(raw, lines, str(path))  # old spellings (ppo.reward, ...) read as the new ones

    profiles = raw.get("profiles") or {}
    if not isinstance(profiles, dict):
        raise RecipeError(f"{path}:{lines.get('profiles', '?')}: 'profiles' must map names to overrides")
    check_keys(Recipe, raw, path, lines)
    for name, body in profiles.items():
        if not isinstance(body, dict):
            raise RecipeError(f"{path}: profiles.{name} must be a mapping of overrides")
        check_keys(Recipe, body, path, lines, prefix=f"profiles.{name}.")

    def where_of(keys) -> str:
        return f"{path}:{lines[dotted(keys)]}" if dotted(keys) in lines else str(path)

    # paths written in the file are relative to its folder (or, for older recipes, the working directory)
    folder, cwd = path.absolute().parent, Path.cwd()
    merged = resolve_paths({k: v for k, v in raw.items() if k != "profiles"}, where_of, folder, cwd)
    if profile is not None:
        if profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            raise RecipeError(f"{path}: no profile '{profile}' (this recipe has: {known})")
        merged = deep_merge(merged, resolve_paths(profiles[profile], where_of, folder, cwd,
                                                  prefix=("profiles", profile)))
        merged["profile"] = profile
    for override in overrides:
        merged = apply_override(merged, override, path)
    merged, references = expand_references(merged, where_of)

    try:
        recipe = Recipe.model_validate(merged)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err, path, lines, profile)) from None
    remember_secrets(merged)
    # kept on the recipe itself so that copies (model_copy) still write `${VAR}`, not the value
    setattr(recipe, REFERENCES_ATTR, references)
    return recipe


def resolved_dict(recipe: Recipe) -> dict:
    """The recipe as it ran: profile and overrides applied, no profiles left, `${VAR}` references as written.
    Valid input to load_recipe. It may hold literal secrets: files get redacted_dict."""
    data = recipe.model_dump(mode="json")
    data.pop("profiles", None)
    return restore_references(data, getattr(recipe, REFERENCES_ATTR, {}))


def redacted_dict(recipe: Recipe) -> dict:
    """resolved_dict with every secret value replaced by '***': what files and trackers get."""
    return redact_tree(resolved_dict(recipe))


def save_resolved(recipe: Recipe, path: Path) -> None:
    path.write_text(yaml.safe_dump(redacted_dict(recipe), sort_keys=False, allow_unicode=True))


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_override(data: dict, override: str, path: Path) -> dict:
    """`train.lr=1e-4` → data['train']['lr'] = 1e-4 (the value is parsed as YAML)."""
    if "=" not in override:
        raise RecipeError(f"override '{override}': expected KEY.PATH=VALUE, e.g. train.lr=1e-4")
    dotted, value_text = override.split("=", 1)
    keys = dotted.strip().split(".")
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = value_text
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    nested = upgrade_override(nested, override)
    check_keys(Recipe, nested, path, {}, prefix="", origin=f"override '{override}'")
    # a path typed on the command line means one relative to where it was typed
    nested = resolve_paths(nested, lambda keys: f"override '{override}'", Path.cwd())
    return deep_merge(data, nested)


def check_keys(model: type[BaseModel], data: dict, path: Path, lines: dict, prefix: str = "",
               origin: Optional[str] = None) -> None:
    """Reject unknown keys, naming the key path and the closest valid key."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in model.model_fields:
            where = origin or f"{path}:{lines.get(full, '?')}"
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            valid = ", ".join(model.model_fields)
            raise RecipeError(f"{where}: unknown key '{full}'{hint} (valid here: {valid})")
        sub = _section_type(model.model_fields[key].annotation)
        if sub is not None and isinstance(value, dict):
            check_keys(sub, value, path, lines, prefix=f"{full}.", origin=origin)


def _section_type(annotation) -> Optional[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def format_validation_error(err: ValidationError, path: Path, lines: dict, profile: Optional[str]) -> str:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "literal[")))
        line = lines.get(loc) or (profile and lines.get(f"profiles.{profile}.{loc}"))
        where = f"{path}:{line}" if line else str(path)
        got = "" if e["type"] == "missing" else f" (got {e.get('input')!r})"
        problems.append(f"{where}: {loc or '(top level)'}: {e['msg']}{got}")
    return "invalid recipe:\n  " + "\n  ".join(problems)


def _key_lines(text: str) -> dict[str, int]:
    """Dotted key path → 1-based line number, for error messages."""
    out: dict[str, int] = {}

    def walk(node, prefix):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                dotted = f"{prefix}{k.value}"
                out[dotted] = k.start_mark.line + 1
                walk(v, dotted + ".")

    walk(yaml.compose(text), "")
    return out
