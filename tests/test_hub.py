"""Hub ids through the Hugging Face cache (issue #15): `model: {source: hub, name: org/name}` and
`data.source: {kind: hub, name: org/dataset}` load from a cache laid out exactly as huggingface_hub writes
it (blobs/, refs/<revision> holding a commit, snapshots/<commit>/ of symlinks into blobs/), built here in
a temp folder from the tiny model, SmolLM2 and chatterbot conversations. Every test is offline
(HF_HUB_OFFLINE=1): nothing here may try the network."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_ftl, tiny_recipe_dict, write_recipe
from ftl.cli import main
from ftl.errors import DataError, RecipeError

TINY_ID = "ftl-test/tiny-chat"
DATA_ID = "ftl-test/chatterbot-chat"
LLAMA_ID = "meta-llama/Llama-3.1-8B-Instruct"
# Llama-3.1-8B-Instruct's config.json as published: enough for `ftl plan`, no weights
LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}


# -- a real hub cache ------------------------------------------------------------------------------
def fill_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], repo_type: str = "model",
                   refs: tuple[str, ...] = ("main",), commit: str | None = None) -> str:
    """Put `files` ({path in the repo: local file}) into `cache` as huggingface_hub stores a download:
    each file's bytes once under blobs/ (named by their sha256, the LFS etag), a snapshots/<commit>/ tree
    of relative symlinks to them, and refs/<branch or tag> holding the commit. Returns the commit."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type=repo_type)
    commit = commit or hashlib.sha1(json.dumps(sorted(files)).encode() + repo_id.encode()).hexdigest()
    for name, source in files.items():
        blob = repo / "blobs" / sha256(source)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            try:
                os.link(source, blob)  # the same bytes, no copy (SmolLM2's weights are 540 MB)
            except OSError:
                blob.write_bytes(source.read_bytes())
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return commit


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def use_cache(monkeypatch, cache: Path) -> None:
    """This process reads `cache`, offline (huggingface_hub reads both variables once, at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def offline_env(cache: Path) -> dict:
    return {"HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf_home"), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A hub cache holding the tiny model (and its tokenizer), a chatterbot chat dataset (train in parquet,
    validation in JSON Lines, as `datasets` shards splits) and Llama-3.1-8B's config.json alone."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import scan_cache_dir

    from ftl.config.schema import TinyModelConfig
    from ftl.data.corpora import chatterbot_rows
    from ftl.models.load import record_texts
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    tmp = tmp_path_factory.mktemp("hub")
    cache = tmp / "hub"
    rows = [row for _, row in chatterbot_rows(["english"], "chat")]
    train, validation = rows[: len(rows) * 9 // 10], rows[len(rows) * 9 // 10:]

    model_dir = tmp / "tiny-model"
    tokenizer = train_tiny_tokenizer(record_texts(train), 400)
    config = TinyModelConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                             vocab_size=400)
    build_tiny_model(config, tokenizer, seed=3).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    tiny_commit = fill_hub_cache(cache, TINY_ID, folder_files(model_dir))

    data_dir = tmp / "dataset"
    (data_dir / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(train), data_dir / "data" / "train-00000-of-00001.parquet")
    (data_dir / "data" / "validation-00000-of-00001.json").write_text(
        "".join(json.dumps(r) + "\n" for r in validation))  # .json holding JSON Lines, common on the hub
    (data_dir / "README.md").write_text("---\nlicense: bsd-3-clause\n---\nchatterbot-corpus English, as chat\n")
    data_commit = fill_hub_cache(cache, DATA_ID, folder_files(data_dir), repo_type="dataset")

    (tmp / "llama.json").write_text(json.dumps(LLAMA_CONFIG))
    fill_hub_cache(cache, LLAMA_ID, {"config.json": tmp / "llama.json"})

    info = scan_cache_dir(cache)  # huggingface_hub itself reads the layout as its own
    assert not info.warnings, info.warnings
    assert {(r.repo_id, r.repo_type) for r in info.repos} == {(TINY_ID, "model"), (DATA_ID, "dataset"),
                                                              (LLAMA_ID, "model")}
    return {"tmp": tmp, "cache": cache, "tiny_commit": tiny_commit, "data_commit": data_commit,
            "train": train, "validation": validation, "model_dir": model_dir}


# -- models ----------------------------------------------------------------------------------------
def test_a_tiny_recipe_trains_from_hub_ids_offline_and_the_manifest_records_the_commit(hub, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe_dict(run, model={"source": "hub", "name": TINY_ID},
                              data={"source": {"kind": "hub", "name": DATA_ID}, "limit": None},
                              train={"max_steps": 4, "save_every": 4})
    proc = run_ftl("run", str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path, timeout=300,
                   **offline_env(hub["cache"]))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    manifest = json.loads((run / "manifest.json").read_text())
    snapshot = hub["cache"] / "models--ftl-test--tiny-chat" / "snapshots" / hub["tiny_commit"]
    assert manifest["model"] == {"source": "hub", "name": TINY_ID, "revision": "main",
                                 "commit": hub["tiny_commit"], "path": str(snapshot.resolve())}
    # the cached tokenizer and weights trained, not a tiny model built for the run
    assert json.loads((run / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"] == \
        json.loads((hub["model_dir"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert not (run / "base").exists() and (run / "final" / "model.safetensors").is_file()
    # the dataset's train split only (its parquet shard), every row read
    assert manifest["data"]["rows"]["read"] == len(hub["train"])
    assert manifest["data"]["sources"][0]["origin"] == f"hub dataset {DATA_ID} (commit {hub['data_commit']})"
    assert sum(manifest["data"]["sizes"].values()) + manifest["data"]["duplicates_dropped"] == len(hub["train"])


def test_smollm2_by_hub_id_gives_the_same_logits_as_by_path(tmp_path, monkeypatch):
    import torch

    from ftl.config.schema import ModelConfig
    from ftl.models.load import load_model, load_tokenizer, pretrained_dir
    from ftl.models.smollm2 import smollm2_dir

    folder = smollm2_dir()  # the pip-shipped SmolLM2, converted once
    commit = fill_hub_cache(tmp_path / "hub", "HuggingFaceTB/SmolLM2-135M-Instruct", folder_files(folder))
    use_cache(monkeypatch, tmp_path / "hub")
    by_id = ModelConfig(source="hub", name="HuggingFaceTB/SmolLM2-135M-Instruct")
    by_path = ModelConfig(source="smollm2")
    assert pretrained_dir(by_id).name == commit

    tokenizers = [load_tokenizer(cfg) for cfg in (by_id, by_path)]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = [t.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for t in tokenizers]
    assert ids[0] == ids[1] and len(ids[0]) > 10
    with torch.no_grad():
        logits = [load_model(cfg, pretrained_dir(cfg)).eval()(torch.tensor([ids[0]])).logits
                  for cfg in (by_id, by_path)]
    assert logits[0].shape[-1] == 49152 and torch.equal(logits[0], logits[1])


def test_a_revision_resolves_as_branch_tag_or_commit(tmp_path, monkeypatch):
    from ftl.config.schema import ModelConfig
    from ftl.models.load import pretrained_dir

    cache = tmp_path / "hub"
    configs = {}
    for name, width in (("old", 64), ("new", 128)):
        configs[name] = tmp_path / f"{name}.json"
        configs[name].write_text(json.dumps({**LLAMA_CONFIG, "hidden_size": width}))
    tagged = fill_hub_cache(cache, "org/model", {"config.json": configs["old"]}, refs=("v1.0",))
    main_commit = fill_hub_cache(cache, "org/model", {"config.json": configs["new"]}, refs=("main", "dev"),
                                 commit="b" * 40)
    use_cache(monkeypatch, cache)

    def hidden(revision):
        folder = pretrained_dir(ModelConfig(source="hub", name="org/model", revision=revision), config_only=True)
        return folder.name, json.loads((folder / "config.json").read_text())["hidden_size"]

    assert hidden(None) == hidden("main") == hidden("dev") == (main_commit, 128)
    assert hidden("v1.0") == hidden(tagged) == (tagged, 64)
    with pytest.raises(RecipeError, match=r"'org/model' \(revision v2\) is not in the Hugging Face cache .*"
                                          r"holds its revisions: dev, main, v1.0.*hf download org/model --revision v2"):
        hidden("v2")


def test_a_model_missing_offline_is_one_error_line_naming_the_id_within_seconds(tmp_path):
    recipe = tiny_recipe_dict(tmp_path / "run", model={"source": "hub", "name": "org/absent-model"})
    (tmp_path / "hub").mkdir()
    start = time.monotonic()
    proc = run_ftl("run", str(write_recipe(tmp_path / "r.yaml", recipe)), cwd=tmp_path, timeout=60,
                   **offline_env(tmp_path / "hub"))
    seconds = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ftl: error:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("ftl: error: model.name: 'org/absent-model' (revision main) is not in the Hugging "
                                f"Face cache at {tmp_path / 'hub'} and HF_HUB_OFFLINE=1"), errors[0]
    assert "`hf download org/absent-model`" in errors[0] and "HF_HUB_CACHE" in errors[0]
    assert seconds < 10, f"{seconds:.1f} s"
    print(f"offline miss reported in {seconds:.2f} s")


def test_plan_reads_a_hub_models_config_from_the_cache_without_weights(hub, capsys, monkeypatch):
    from ftl.config.schema import ModelConfig
    from ftl.models.load import pretrained_dir

    use_cache(monkeypatch, hub["cache"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as done:  # node8 without its architecture: the shape comes from the cache
        main(["plan", "recipes/full_zero3.yaml", "--profile", "node8", "model.architecture=null"])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    assert "8,030.3M parameters, 8 device(s)" in out
    with pytest.raises(RecipeError, match=r"holds no weights \(\*.safetensors or \*.bin\), only \['config.json'\]: "
                                          r"fetch them with `hf download meta-llama/Llama-3.1-8B-Instruct`"):
        pretrained_dir(ModelConfig(source="hub", name=LLAMA_ID))  # training would need them


def test_with_network_the_transformers_files_are_fetched_into_the_cache(tmp_path, monkeypatch):
    """The online path, with huggingface_hub's download replaced (this machine has no hub): ftl asks for
    the revision's transformers files into HF_HUB_CACHE, not Llama's duplicate original/ checkpoint; a hub
    that cannot be reached, with nothing cached, is named with its connection error."""
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from ftl.config.schema import ModelConfig
    from ftl.models.load import pretrained_dir

    snapshot = tmp_path / "hub" / "models--org--online" / "snapshots" / ("c" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model.safetensors").write_bytes(b"")
    calls = []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kwargs: calls.append((repo_id, kwargs)) or str(snapshot))
    assert pretrained_dir(ModelConfig(source="hub", name="org/online", revision="v1")) == snapshot
    [(repo_id, kwargs)] = calls
    assert (repo_id, kwargs["repo_type"], kwargs["revision"], kwargs["local_files_only"], kwargs["cache_dir"]) == \
        ("org/online", "model", "v1", False, str(tmp_path / "hub"))
    assert "*.safetensors" in kwargs["allow_patterns"] and "original/*" in kwargs["ignore_patterns"]

    def unreachable(repo_id, **kwargs):
        try:
            raise ConnectionError("[Errno 111] Connection refused")
        except ConnectionError as err:
            raise LocalEntryNotFoundError("cannot find the snapshot on the local disk") from err

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(RecipeError, match=r"'org/other' \(revision main\) is not in the Hugging Face cache .* and the "
                                          r"hub could not be reached \(ConnectionError: \[Errno 111\] Connection "
                                          r"refused\): fetch it .*`hf download org/other`"):
        pretrained_dir(ModelConfig(source="hub", name="org/other"))


@pytest.mark.parametrize("model,expected", [
    ({"source": "hub"}, r":\d+: model: Value error, source 'hub' needs model.name"),
    ({"source": "hub", "name": "meta-llama/Llama/3"}, r":\d+: model.name: Value error, expected a hub id such as "
                                                      r"org/name .*'namespace/repo_name'"),
    ({"source": "hub", "name": "org--name"}, r":\d+: model.name: Value error, expected a hub id"),
])
def test_a_bad_hub_id_is_a_recipe_error_at_its_line(tmp_path, model, expected):
    from ftl.config import load_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe_dict(tmp_path / "run", model=model))
    with pytest.raises(RecipeError, match=expected):
        load_recipe(path)


def test_shipped_gpu_profiles_name_hub_ids_not_site_folders():
    from ftl.config import load_recipe

    for recipe, profile in (("full_zero3", "node8"), ("full_zero3", "multinode"), ("qlora_single", "gpu1")):
        model = load_recipe(ROOT / "recipes" / f"{recipe}.yaml", profile).model
        assert (model.source, model.name) == ("hub", LLAMA_ID) and model.architecture, (recipe, profile)
    for path in ROOT.glob("recipes/**/*.yaml"):
        assert "/models/" not in path.read_text(), path


# -- datasets --------------------------------------------------------------------------------------
def hub_data(**source) -> "DataConfig":  # noqa: F821
    from ftl.config.schema import DataConfig

    return DataConfig(source={"kind": "hub", "name": DATA_ID, **source}, format="chat",
                      split={"validation": 0.0})


def test_a_hub_datasets_splits_are_found_as_datasets_finds_them(hub, monkeypatch):
    from ftl.data import load_splits

    def conversations(rows) -> set[str]:
        return {json.dumps(r["messages"], sort_keys=True) for r in rows}

    use_cache(monkeypatch, hub["cache"])
    train, report = load_splits(hub_data())  # the parquet shard of the train split
    assert report.read == len(hub["train"]) and conversations(train.train) == conversations(hub["train"])
    validation, report = load_splits(hub_data(split="validation"))  # JSON Lines in a .json file
    assert report.read == len(hub["validation"])
    assert conversations(validation.train) == conversations(hub["validation"])
    chosen, _ = load_splits(hub_data(files=["data/validation-*"], revision=hub["data_commit"]))
    assert conversations(chosen.train) == conversations(hub["validation"])
    with pytest.raises(DataError, match=r"no split 'test' \(found: train, validation\)"):
        load_splits(hub_data(split="test"))


def test_a_dataset_missing_offline_is_one_error_line_naming_the_id(hub, tmp_path, capsys, monkeypatch):
    use_cache(monkeypatch, hub["cache"])
    recipe = tiny_recipe_dict(tmp_path / "run", data={"source": {"kind": "hub", "name": "org/absent-data"}})
    with pytest.raises(SystemExit) as done:
        main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("ftl: error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith("ftl: error: data.source.name: 'org/absent-data' (revision main) is not in the "
                                "Hugging Face cache"), errors[0]
    assert "`hf download org/absent-data --repo-type dataset`" in errors[0]
    assert not (tmp_path / "run").exists()  # refused before anything started


@pytest.mark.parametrize("data, key", [
    ({"source": None, "sources": [{"kind": "chatterbot", "languages": ["english"]},
                                  {"kind": "hub", "name": "org/absent-data"}]}, "data.sources[1]"),
    ({"split": {"validation": 0.0}, "splits": {"validation": {"kind": "hub", "name": "org/absent-data"}}},
     "data.splits.validation"),
])
def test_a_missing_hub_dataset_among_sources_or_splits_names_its_key(hub, tmp_path, capsys, monkeypatch, data, key):
    use_cache(monkeypatch, hub["cache"])
    recipe = tiny_recipe_dict(tmp_path / "run", data=data)
    with pytest.raises(SystemExit) as done:
        main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftl: error:")]
    assert done.value.code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"ftl: error: {key}.name: 'org/absent-data' (revision main) is not in the "
                                "Hugging Face cache"), errors[0]
    assert not (tmp_path / "run").exists()  # refused by the runner, before the stage started


def test_a_hub_dataset_source_in_a_recipe_file(tmp_path):
    from ftl.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "run", data={"source": {
        "kind": "hub", "name": DATA_ID, "revision": "v2", "split": "validation", "files": ["data/*.json"]}})))
    source = load_recipe(path).data.source
    assert (source.kind, source.name, source.revision, source.split, source.files) == \
        ("hub", DATA_ID, "v2", "validation", ["data/*.json"])
    path.write_text(path.read_text().replace(f"name: {DATA_ID}", "name: a/b/c"))
    with pytest.raises(RecipeError, match=r"r.yaml:\d+: data.source.name: Value error, expected a hub id"):
        load_recipe(path)
