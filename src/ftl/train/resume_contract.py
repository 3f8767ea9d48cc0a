"""What `--resume` may not change: the training-relevant resolved recipe and the data splits.

A fresh run writes its contract (`resume_contract.json`: the resolved recipe flattened to dotted keys,
and the split fingerprints) once its data has validated; every checkpoint records the contract's
digest. `--resume` compares the new recipe and data with it and refuses any change outside ALLOWED,
listing each changed key (old → new) — an optimizer state continued on another split or learning rate
is a different run that records itself as this one.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from ftl.config.schema import Recipe
from ftl.errors import RecipeError
from ftl.run_dir import CONTRACT_FILE

# Safe to change on resume: how a run is evaluated, tracked, saved, named and launched (not how many
# ranks: the data order depends on the world size), a longer train.max_steps (checked separately), and the
# loss's chunk size (the same loss and gradients, less memory: lower it and resume after running out; runs
# started before the key existed resume too), and how torch runs the optimizer's update (train.optimizer_impl:
# fused, foreach and single-tensor AdamW/SGD compute the same update up to float rounding and share one state
# layout, so a checkpoint of one continues in another), and train.host_allocator (where freed host memory goes:
# the same numbers either way; runs started before the key existed resume too). Not train.compile: compiled blocks round differently
# from eager ones, so switching it mid-run would make a curve no single setting produces.
ALLOWED = ("name", "description", "profile", "profiles.*", "eval.*", "track.*", "compare.*",
           "train.save_every", "train.keep_checkpoints", "train.log_every", "train.max_steps",
           "train.loss_chunk_tokens", "train.optimizer_impl", "train.host_allocator",
           "train.stall_timeout_s", "train.early_stopping.patience", "launch.launcher", "launch.config_file",
           "launch.env.*", "launch.main_process_port", "launch.device_memory_gb", "launch.cpus_per_task",
           "launch.mem")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def allowed(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ALLOWED)


def make_contract(resolved: dict, split_fingerprints: dict) -> dict:
    recipe = {k: v for k, v in flatten(resolved).items() if not allowed(k)}
    return {"recipe": recipe, "splits": split_fingerprints}


def digest(contract: dict) -> str:
    return hashlib.sha256(json.dumps(contract, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_contract(run_dir: Path, contract: dict) -> None:
    (Path(run_dir) / CONTRACT_FILE).write_text(json.dumps(contract, indent=1, sort_keys=True, default=str))


def read_contract(run_dir: Path) -> Optional[dict]:
    path = Path(run_dir) / CONTRACT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


UNKNOWN = object()


def schema_default(key: str) -> Any:
    """The recipe schema's default for a dotted key (as the contract stores it), UNKNOWN for no such key or
    a required one."""
    cls: Any = Recipe
    parts = key.split(".")
    for i, part in enumerate(parts):
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            return UNKNOWN
        if i == len(parts) - 1:
            if field.is_required():
                return UNKNOWN
            default = field.get_default(call_default_factory=True)
            default = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            return json.loads(json.dumps(default, default=str))
        cls = next((t for t in (field.annotation, *getattr(field.annotation, "__args__", ()))
                    if isinstance(t, type) and issubclass(t, BaseModel)), None)
    return UNKNOWN


def new_key_at_default(key: str, recipe_old: dict, recipe_new: dict) -> bool:
    """A key the run's ftl did not know yet (absent from its contract), left at its default: it changes
    nothing, so runs started before an upgrade that added keys stay resumable."""
    return key not in recipe_old and key in recipe_new and recipe_new[key] == schema_default(key)


def changes(old: dict, new: dict) -> list[str]:
    """'key: old → new' for every training-relevant difference (recipe keys, then data splits)."""
    lines = []
    recipe_old, recipe_new = old.get("recipe", {}), new.get("recipe", {})
    for key in sorted(set(recipe_old) | set(recipe_new)):
        if new_key_at_default(key, recipe_old, recipe_new):
            continue
        if recipe_old.get(key, "(unset)") != recipe_new.get(key, "(unset)"):
            lines.append(f"{key}: {recipe_old.get(key, '(unset)')!r} → {recipe_new.get(key, '(unset)')!r}")
    for split in sorted(set(old.get("splits", {})) | set(new.get("splits", {}))):
        was, now = old.get("splits", {}).get(split), new.get("splits", {}).get(split)
        if was != now:
            lines.append(f"data split '{split}': fingerprint {was} → {now} (other records)")
    return lines


def check_resume(run_dir: Path, contract: dict) -> None:
    """Refuse a resume whose recipe or data differ from the run's in a training-relevant way."""
    old = read_contract(run_dir)
    if old is None:
        raise RecipeError(f"--resume: {Path(run_dir) / CONTRACT_FILE} is missing or unreadable, so this resume "
                          "cannot be checked against the run it continues; start afresh with --overwrite")
    changed = changes(old, contract)
    if changed:
        raise RecipeError(f"--resume: the recipe or data changed since {run_dir} started, and a resumed run must "
                          "continue the same training (its optimizer state, schedule and data order):\n  "
                          + "\n  ".join(changed)
                          + f"\nResume with the original settings, or start afresh with --overwrite (safe to change "
                            f"on resume: {', '.join(ALLOWED)})")


def check_resume_step(step: int, total: int, checkpoint: Path, report) -> None:
    """A checkpoint past the recipe's end is refused (not "step 50 of 30"); one at the end only finishes."""
    if step > total:
        raise RecipeError(f"--resume: {checkpoint} is at step {step}, past the end of this recipe (step {total}, "
                          "from train.max_steps or train.epochs); raise train.max_steps to train on, or start "
                          "afresh with --overwrite")
    if step == total:
        report(f"ftl: {checkpoint} is the recipe's last step ({total}): nothing left to train, finishing "
               "(final evaluation and save)")
