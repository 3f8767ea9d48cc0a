"""`ftl recipes`: the shipped recipes and pipelines, each with its one-line description and profiles.

Read as plain YAML (no schema, no torch), so listing stays instant; a file that does not parse is listed
with the reason instead of stopping the listing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from ftl.errors import FtlError

SHIPPED = Path(__file__).resolve().parents[2] / "recipes"  # the checkout's recipes/ (installed editable)


@dataclass
class Entry:
    path: str
    kind: str          # the recipe's stage, or "pipeline"
    description: str
    profiles: list[str]


def recipes_folder(folder: Optional[str]) -> Path:
    """The folder to list: the one given, else ./recipes, else the checkout ftl runs from."""
    for candidate in ([Path(folder)] if folder else [Path("recipes"), SHIPPED]):
        if candidate.is_dir():
            return candidate
    raise FtlError(f"{folder or 'recipes'}: no such folder of recipes (give one: ftl recipes FOLDER)")


def describe(path: Path) -> Entry:
    shown = os.path.relpath(path)  # a path the user can pass to ftl run from where they are
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        return Entry(shown, "?", f"(cannot read: {str(err).splitlines()[0]})", [])
    if not isinstance(data, dict):
        return Entry(shown, "?", "(not a mapping)", [])
    kind = "pipeline" if "stages" in data else str(data.get("stage", "sft"))
    profiles = data.get("profiles")
    return Entry(shown, kind, str(data.get("description", "")).strip(),
                 list(profiles) if isinstance(profiles, dict) else [])


def catalog(folder: Optional[str] = None) -> list[Entry]:
    root = recipes_folder(folder)
    return [describe(p) for p in sorted(root.rglob("*.yaml"))]


def render(entries: list[Entry]) -> str:
    width = max((len(e.path) for e in entries), default=0)
    lines = []
    for e in entries:
        profiles = f"  [profiles: {', '.join(e.profiles)}]" if e.profiles else ""
        lines.append(f"{e.path:<{width}}  {e.kind:<8}  {e.description}{profiles}")
    return "\n".join(lines)
