"""Secrets in a recipe reach no file and no printed command; `${VAR}` references stay references until
launch; relative paths resolve against the recipe's folder (then the working directory); a run folder that
cannot be made is a named error."""

import io
import json
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import yaml

from conftest import RECIPES, ROOT, run_ftl, tiny_recipe_dict, write_recipe
from ftl.cli import main
from ftl.config import load_recipe, redacted_dict, resolved_dict, save_resolved
from ftl.config.environment import PATH_KEYS
from ftl.errors import LaunchError, RecipeError
from ftl.launch.command import build_launch_command, runnable
from ftl.run_dir import ensure_run_dir, run_dir_for

TOKEN = "ftl-fake-token-0123456789abcdef"            # by name: launch.env.HF_TOKEN, on the command line
SHAPED = "hf_ftlFakeShapedToken0123456789"            # by shape: a neutral name, written in the recipe file
REFERENCED = "ftl-referenced-value-9876543210"       # only in the environment, as FTL_TEST_TOKEN
SECRETS = (TOKEN, SHAPED, REFERENCED)


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        main(list(argv))
    return exit_.value.code, out.getvalue(), err.getvalue()


# -- secrets, end to end -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def secret_run(tmp_path_factory):
    """`ftl launch --dry-run`, then a real `ftl run` with W&B offline, of a recipe holding all three."""
    tmp = tmp_path_factory.mktemp("secrets")
    recipe = tiny_recipe_dict(tmp / "run", track={"output_dir": str(tmp / "run"),
                                                  "wandb": {"enabled": True, "mode": "offline"}},
                              launch={"env": {"HUB_LOGIN": SHAPED, "OTHER_TOKEN": "${FTL_TEST_TOKEN}"}},
                              train={"max_steps": 4, "save_every": 2})
    (tmp / "input").mkdir()
    path = write_recipe(tmp / "input" / "recipe.yaml", recipe)  # the user's own file: the one place it may be
    override = f"launch.env.HF_TOKEN={TOKEN}"
    env = dict(FTL_TEST_TOKEN=REFERENCED, WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb_dir"),
               WANDB_CACHE_DIR=str(tmp / "wandb_cache"), WANDB_CONFIG_DIR=str(tmp / "wandb_config"),
               WANDB_DATA_DIR=str(tmp / "wandb_data"))
    dry = run_ftl("launch", str(path), "--dry-run", override, cwd=tmp, **env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    run = run_ftl("run", str(path), override, cwd=tmp, **env)
    assert run.returncode == 0, run.stderr[-3000:]
    wait_until_flushed(tmp / "run")
    return tmp, dry, run


def wait_until_flushed(run_dir: Path, timeout: float = 30) -> None:
    """W&B's service finishes writing the .wandb file after the run's process has exited."""
    files, last, deadline = [], None, time.time() + timeout
    while time.time() < deadline:
        files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
        size = [f.stat().st_size for f in files]
        if files and size == last:
            return
        last = size
        time.sleep(1)
    assert files, "no W&B offline run file"


def test_no_file_and_no_output_holds_a_secret(secret_run):
    tmp, dry, run = secret_run
    files = [p for p in tmp.rglob("*") if p.is_file() and p.parent != tmp / "input"]
    names = {p.name for p in files}
    # the places a secret leaked to before: the resolved recipe, W&B's run file and debug logs, checkpoints
    assert {"recipe.yaml", "manifest.json", "debug.log"} <= names, sorted(names)
    assert any(p.suffix == ".wandb" for p in files) and any("checkpoints" in p.parts for p in files)
    for path in files:
        data = path.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data, f"{secret} written to {path}"
    for name, text in [("ftl launch --dry-run stdout", dry.stdout), ("ftl launch --dry-run stderr", dry.stderr),
                       ("ftl run stdout", run.stdout), ("ftl run stderr", run.stderr)]:
        for secret in SECRETS:
            assert secret not in text, f"{secret} in {name}"


def test_files_keep_the_reference_and_hide_the_literals(secret_run):
    tmp, _, _ = secret_run
    saved = yaml.safe_load((tmp / "run" / "recipe.yaml").read_text())
    assert saved["launch"]["env"] == {"HUB_LOGIN": "***", "OTHER_TOKEN": "${FTL_TEST_TOKEN}", "HF_TOKEN": "***"}
    manifest = json.loads((tmp / "run" / "manifest.json").read_text())
    assert "launch.env.HF_TOKEN=***" in manifest["command"]
    wandb_file = next((tmp / "run").glob("wandb/offline-run-*/run-*.wandb")).read_bytes()
    assert b"OTHER_TOKEN" in wandb_file and b"${FTL_TEST_TOKEN}" in wandb_file  # W&B got the config, redacted


def test_printed_launch_command_shows_no_value(secret_run):
    _, dry, _ = secret_run
    command = dry.stdout.split("ftl: launch command:", 1)[1]
    assert "HUB_LOGIN=***" in command and "launch.env.HF_TOKEN=***" in command
    assert 'OTHER_TOKEN="${FTL_TEST_TOKEN}"' in command  # pasted into a shell, it expands like ftl does


# -- secrets and references, in process ----------------------------------------------------------------

def test_launch_environment_gets_the_referenced_value_only_when_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_TEST_TOKEN", REFERENCED)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", launch={
        "launcher": "python", "env": {"HF_TOKEN": "${FTL_TEST_TOKEN}", "NOTE": "a ${FTL_TEST_TOKEN} b"}}))
    recipe = load_recipe(path)
    assert recipe.launch.env["HF_TOKEN"] == "${FTL_TEST_TOKEN}"
    command = build_launch_command(recipe, str(path))
    _, env = runnable(command)
    assert env["HF_TOKEN"] == REFERENCED and env["NOTE"] == f"a {REFERENCED} b"
    assert REFERENCED not in command.shell() and REFERENCED not in json.dumps(redacted_dict(recipe))


def test_unset_reference_is_refused_naming_key_and_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("FTL_UNSET_VARIABLE", raising=False)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run",
                                                              launch={"env": {"HF_TOKEN": "${FTL_UNSET_VARIABLE}"}}))
    code, _, err = cli("launch", str(path), "--dry-run")
    assert code == 2 and "Traceback" not in err
    assert err.startswith("ftl: error:") and "launch.env.HF_TOKEN" in err and "FTL_UNSET_VARIABLE" in err
    load_recipe(path)  # reading it (ftl merge, eval) does not need the value: only launching does

    recipe = tiny_recipe_dict(tmp_path / "run", track={"output_dir": str(tmp_path / "run"),
                                                       "wandb": {"entity": "${FTL_UNSET_VARIABLE}"}})
    with pytest.raises(RecipeError, match=r"r2\.yaml:\d+: track\.wandb\.entity: .*FTL_UNSET_VARIABLE is not set"):
        load_recipe(write_recipe(tmp_path / "r2.yaml", recipe))


def test_reference_outside_launch_env_is_expanded_and_written_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FTL_ENTITY", "my-team")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(
        tmp_path / "run", track={"output_dir": str(tmp_path / "run"), "wandb": {"entity": "${FTL_ENTITY}"}}))
    recipe = load_recipe(path)
    assert recipe.track.wandb.entity == "my-team"
    copy = recipe.model_copy(update={"name": "other"})  # stages copy recipes (the QAT baseline) and save them
    assert resolved_dict(copy)["track"]["wandb"]["entity"] == "${FTL_ENTITY}"
    save_resolved(copy, tmp_path / "saved.yaml")
    assert "${FTL_ENTITY}" in (tmp_path / "saved.yaml").read_text() and "my-team" not in (tmp_path / "saved.yaml").read_text()


def test_secret_keys_anywhere_are_hidden_and_lookalikes_are_not(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", reward={"kind": "function", "function": "m:f",
                                                        "kwargs": {"api_key": "abc123secret", "temperature": "hot"}},
                              model={"architecture": {"model_type": "llama", "tokenizer_class": "LlamaTokenizerFast"}})
    written = redacted_dict(load_recipe(write_recipe(tmp_path / "r.yaml", recipe)))
    assert written["reward"]["kwargs"] == {"api_key": "***", "temperature": "hot"}
    assert written["model"]["architecture"]["tokenizer_class"] == "LlamaTokenizerFast"
    assert written["sampling"]["max_new_tokens"] == 24


def test_a_saved_recipe_with_a_hidden_secret_is_not_launched_with_the_placeholder(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", launch={"env": {"HF_TOKEN": TOKEN}}))
    save_resolved(load_recipe(path), tmp_path / "saved.yaml")
    with pytest.raises(LaunchError, match=r"launch\.env\.HF_TOKEN is '\*\*\*'.*HF_TOKEN: \$\{HF_TOKEN\}"):
        build_launch_command(load_recipe(tmp_path / "saved.yaml"), str(tmp_path / "saved.yaml"))


# -- paths -------------------------------------------------------------------------------------------

PATH_RECIPES = {  # each path key, set to a relative path in an otherwise valid recipe
    ("model", "path"): {"model": {"source": "path", "path": "files/thing"}},
    ("data", "source", "path"): {"data": {"source": {"kind": "jsonl", "path": "files/thing"}, "format": "chat"}},
    ("data", "sources", "*", "path"): {"data": {"source": None, "sources": [{"kind": "jsonl", "path": "files/thing"}],
                                                "format": "chat"}},
    ("data", "splits", "train", "path"): {"data": {"source": None, "format": "chat",
                                                   "splits": {"train": {"kind": "jsonl", "path": "files/thing"}}}},
    ("data", "splits", "validation", "path"): {"data": {"split": {}, "format": "chat", "splits": {
        "validation": {"kind": "jsonl", "path": "files/thing"}}}},
    ("data", "splits", "test", "path"): {"data": {"format": "chat", "splits": {
        "test": {"kind": "jsonl", "path": "files/thing"}}}},
    ("launch", "config_file"): {"launch": {"config_file": "files/thing"}},
    ("launch", "deepspeed"): {"launch": {"deepspeed": "files/thing"}},
    ("reward", "path"): {"reward": {"kind": "model", "path": "files/thing"}},
}


def value_at(recipe, keys):
    for key in keys:
        recipe = recipe[0] if key == "*" else getattr(recipe, key)  # '*': every list item (the test has one)
    return recipe


def test_every_path_key_is_covered():
    assert set(PATH_RECIPES) == set(PATH_KEYS)


@pytest.mark.parametrize("keys", list(PATH_RECIPES), ids=".".join)
def test_relative_path_resolves_against_the_recipe_folder(tmp_path, monkeypatch, keys):
    folder, elsewhere = tmp_path / "recipes", tmp_path / "elsewhere"
    (folder / "files").mkdir(parents=True)
    (folder / "files" / "thing").write_text("{}\n")
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write_recipe(folder / "r.yaml", tiny_recipe_dict(tmp_path / "run", **PATH_RECIPES[keys]))
    recipe = load_recipe(path)
    assert value_at(recipe, keys) == str(folder / "files" / "thing")
    save_resolved(recipe, tmp_path / "saved.yaml")  # the run folder's copy holds the absolute path
    saved = yaml.safe_load((tmp_path / "saved.yaml").read_text())
    for key in keys:
        saved = saved[0 if key == "*" else key]
    assert saved == str(folder / "files" / "thing")


def test_working_directory_is_the_fallback_and_overrides_mean_the_working_directory(tmp_path, monkeypatch):
    folder, cwd = tmp_path / "recipes", tmp_path / "cwd"
    for where in (folder, cwd):
        (where / "data").mkdir(parents=True)
    (cwd / "data" / "only_here.jsonl").write_text("{}\n")
    (folder / "data" / "both.jsonl").write_text("{}\n")
    (cwd / "data" / "both.jsonl").write_text("{}\n")
    monkeypatch.chdir(cwd)

    def data_path(value, overrides=()):
        recipe = tiny_recipe_dict(tmp_path / "run", data={"source": {"kind": "jsonl", "path": value}, "format": "chat"})
        return load_recipe(write_recipe(folder / "r.yaml", recipe), overrides=list(overrides)).data.source.path

    assert data_path("data/only_here.jsonl") == str(cwd / "data" / "only_here.jsonl")  # older cwd-relative recipes
    assert data_path("data/both.jsonl") == str(folder / "data" / "both.jsonl")
    assert data_path("data/missing.jsonl") == str(folder / "data" / "missing.jsonl")  # the error names this one
    assert data_path("x", ["data.source.path=data/both.jsonl"]) == str(cwd / "data" / "both.jsonl")


def test_home_and_variables_expand_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FTL_DATA", str(tmp_path / "data"))
    monkeypatch.delenv("FTL_UNSET_VARIABLE", raising=False)
    # a profile not chosen is not expanded: its variables may belong to another machine
    profiles = {"p": {"launch": {"deepspeed": "$FTL_DATA/ds.json"}},
                "other_machine": {"model": {"path": "$FTL_UNSET_VARIABLE/m"}}}
    recipe = tiny_recipe_dict(tmp_path / "run", model={"source": "path", "path": "~/models/m"},
                              data={"source": {"kind": "jsonl", "path": "${FTL_DATA}/x.jsonl"}, "format": "chat"},
                              profiles=profiles)
    loaded = load_recipe(write_recipe(tmp_path / "r.yaml", recipe), "p")
    assert loaded.model.path == str(tmp_path / "home" / "models" / "m")
    assert loaded.data.source.path == str(tmp_path / "data" / "x.jsonl")
    assert loaded.launch.deepspeed == str(tmp_path / "data" / "ds.json")
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: model\.path: environment variable FTL_UNSET_VARIABLE"):
        load_recipe(tmp_path / "r.yaml", "other_machine")
    recipe["data"]["source"]["path"] = "$FTL_UNSET_VARIABLE/x.jsonl"
    with pytest.raises(RecipeError, match=r"r\.yaml:\d+: data\.source\.path: environment variable FTL_UNSET_VARIABLE"):
        load_recipe(write_recipe(tmp_path / "r.yaml", recipe), "p")


def test_shipped_recipes_find_their_files_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    checked = 0
    for path in sorted(RECIPES.rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if "stage" not in raw and "data" not in raw:
            continue  # a pipeline file
        for profile in [None, *raw.get("profiles", {})]:
            recipe = load_recipe(path, profile)
            for keys in (("launch", "config_file"), ("launch", "deepspeed")):
                value = value_at(recipe, keys)
                if value:
                    assert Path(value).is_absolute() and Path(value).is_file(), (path.name, profile, keys, value)
                    checked += 1
    assert checked >= 6
    code, out, err = cli("launch", str(RECIPES / "full_zero3.yaml"), "--profile", "tiny", "--dry-run")
    assert code == 0, err
    assert f"--config_file {ROOT / 'launch' / 'zero3.yaml'}" in out


# -- the run folder --------------------------------------------------------------------------------

def test_unknown_output_dir_placeholder_is_named(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(
        tmp_path / "run", track={"output_dir": str(tmp_path / "{user}-{name}")})))
    with pytest.raises(RecipeError, match=r"track\.output_dir .*unknown placeholder \{user\} \(known: \{name\}, \{profile\}\)"):
        run_dir_for(recipe)
    recipe.track.output_dir = str(tmp_path / "{name")
    with pytest.raises(RecipeError, match=r"track\.output_dir .*\{name\}, \{profile\}"):
        run_dir_for(recipe)
    recipe.track.output_dir = str(tmp_path / "{name}-{profile}")
    assert run_dir_for(recipe) == tmp_path / "t-base"


def test_unknown_output_dir_placeholder_is_one_error_line_from_ftl_run(tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run",
                                                              track={"output_dir": str(tmp_path / "{user}")}))
    code, _, err = cli("run", str(path))
    assert code == 2 and "Traceback" not in err and err.count("ftl: error:") == 1 and "{user}" in err


def test_run_folder_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for target in (tmp_path / "a_file", tmp_path / "a_file" / "run"):
        with pytest.raises(RecipeError, match=rf"track\.output_dir: cannot create the run folder {target} "
                                              rf"\({tmp_path / 'a_file'} is a file, not a folder\)"):
            ensure_run_dir(target)
    assert ensure_run_dir(tmp_path / "new" / "run").is_dir()
