"""Layers import downward only: every `from ftl.X import ...` (module-level or inside a function) in a
package goes to a package of a lower layer, or stays inside its own package."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ftl"

# lower number = lower layer; a package may import only packages below it (or itself)
LAYERS = {
    "errors": 0, "process_exit": 0, "console": 0,
    "config": 1, "packages": 1, "hub_cache": 1,
    "run_dir": 2,
    "data": 3, "track": 3, "launch": 3, "run_lock": 3,
    "methods": 4,
    "models": 5,
    "train": 6, "rl": 6,  # rl below evaluate: `ftl eval` of a policy run compares it as the RL stages do
    "evaluate": 7, "plan": 7,
    "stages": 8,
    "runner": 9, "pipeline": 9, "compare": 9, "catalog": 9, "chat": 9,
    "slurm": 10,
    "cli": 11, "__main__": 12,
}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ftl"


def imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ftl":
            if node.module == "ftl":
                yield from ((a.name, node.lineno) for a in node.names)
            else:
                yield package_of(node.module), node.lineno
        elif isinstance(node, ast.Import):
            yield from ((package_of(a.name), node.lineno) for a in node.names if a.name.startswith("ftl."))


def test_every_package_has_a_layer():
    found = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
    assert found == set(LAYERS)


def test_packages_import_downward_only():
    upward = []
    for path in SRC.rglob("*.py"):
        relative = path.relative_to(SRC)
        own = relative.parts[0].removesuffix(".py") if len(relative.parts) > 1 or relative.stem != "__init__" \
            else "ftl"
        for target, line in imports(path):
            if target != own and LAYERS[target] >= LAYERS[own]:
                upward.append(f"{relative}:{line} ({own}, layer {LAYERS[own]}) imports {target} (layer {LAYERS[target]})")
    assert not upward, "\n".join(upward)
