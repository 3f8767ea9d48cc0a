"""Old recipe spellings, read as the new ones with a one-line note on stderr.

Until issue 12 the `ppo:` section also held the reward and the sampling settings that DPO and GRPO
read. They are top-level sections now: `ppo.reward` → `reward`, `ppo.missing_eos_penalty` →
`reward.missing_eos_penalty`, `ppo.max_new_tokens|temperature|top_k` → `sampling.*`. The mapping
applies to a recipe, each of its profiles and each dotted override, before keys are checked.
"""

from __future__ import annotations

import copy
import os
import sys

from ftl.errors import RecipeError

# old dotted key → new dotted key (the old ones all live under `ppo`)
MOVES = {
    "ppo.reward": "reward",
    "ppo.missing_eos_penalty": "reward.missing_eos_penalty",
    "ppo.max_new_tokens": "sampling.max_new_tokens",
    "ppo.temperature": "sampling.temperature",
    "ppo.top_k": "sampling.top_k",
}


def upgrade(section: dict, where: str) -> tuple[dict, list[str]]:
    """`section` (a recipe or a profile body) with old keys moved to their new place, and what moved."""
    ppo = section.get("ppo")
    if not isinstance(ppo, dict) or not any(old.split(".", 1)[1] in ppo for old in MOVES):
        return section, []
    section = copy.deepcopy(section)
    ppo, moved = section["ppo"], []
    for old, new in MOVES.items():
        name = old.split(".", 1)[1]
        if name not in ppo:
            continue
        *parents, leaf = new.split(".")
        target = section
        for key in parents:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(f"{where}: both '{old}' (the old spelling) and '{key}' are given: keep '{new}'")
        if leaf in target:
            raise RecipeError(f"{where}: both '{old}' (the old spelling) and '{new}' are given: keep '{new}'")
        target[leaf] = ppo.pop(name)
        moved.append(f"'{old}' is now '{new}'")
    if not ppo:
        del section["ppo"]
    return section, moved


def upgrade_recipe(raw: dict, lines: dict[str, int], where: str) -> tuple[dict, dict[str, int]]:
    """The recipe and each profile body upgraded (one note for the file); `lines` also knows the new keys."""
    raw, moved = upgrade(raw, where)
    profiles = raw.get("profiles")
    if isinstance(profiles, dict):
        for name, body in profiles.items():
            if isinstance(body, dict):
                profiles[name], in_profile = upgrade(body, f"{where}: profiles.{name}")
                moved += [m for m in in_profile if m not in moved]
    if not moved:
        return raw, lines
    note(where, moved, "rename them in the recipe")
    return raw, {**lines, **{new_key(key): line for key, line in lines.items()}}


def upgrade_override(nested: dict, override: str) -> dict:
    """A dotted override (already nested: {'ppo': {'reward': {'path': ...}}}) in the new spelling."""
    nested, moved = upgrade(nested, f"override '{override}'")
    if moved:
        note(f"override '{override}'", moved, "use the new key")
    return nested


def new_key(dotted: str) -> str:
    """A dotted key (optionally under profiles.NAME.) in the new spelling, e.g. for error line numbers."""
    parts = dotted.split(".")
    start = 2 if parts[0] == "profiles" else 0
    head, rest = ".".join(parts[:start]), ".".join(parts[start:])
    for old, new in MOVES.items():
        if rest == old or rest.startswith(old + "."):
            rest = new + rest[len(old):]
            break
    return f"{head}.{rest}" if head else rest


def note(where: str, moved: list[str], advice: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # once per launch, not once per rank
        print(f"ftl: note: {where}: {', '.join(moved)} (read as such); {advice}", file=sys.stderr, flush=True)
