"""The recipe schema names the same kinds as the tables that implement them: stages, methods, data
sources, launchers. Adding a name to the schema without its row (or a row without its name) fails here."""

import dataclasses
import importlib.util
from typing import get_args

import pytest

from ftl.config.schema import (METHOD_KINDS, PATH_SOURCE_KINDS, STAGE_NAMES, DataConfig, LaunchConfig, MethodConfig,
                               Recipe, SourceConfig)
from ftl.config.stages import STAGES
from ftl.data.sources import SOURCES
from ftl.launch.command import LAUNCHERS
from ftl.methods import METHODS, MethodInfo


def literal_values(model, field: str) -> set:
    return set(get_args(model.model_fields[field].annotation))


def test_every_chat_template_name_has_a_template():
    from ftl.config.schema import CHAT_TEMPLATE_NAMES
    from ftl.data.chat_templates import CHAT_TEMPLATES

    assert set(CHAT_TEMPLATE_NAMES) == set(CHAT_TEMPLATES)
    assert all(name == template.origin and template.end_of_turn in template.markers
               for name, template in CHAT_TEMPLATES.items())


def test_every_source_kind_has_a_reader():
    assert literal_values(SourceConfig, "kind") == set(SOURCES)


def test_every_data_format_has_a_module_giving_the_kind_the_schema_says():
    from ftl.config.schema import FORMAT_KINDS
    from ftl.data.formats import FORMATS

    assert FORMAT_KINDS == {name: info.kind for name, info in FORMATS.items()}
    assert literal_values(DataConfig, "format") == set(FORMATS) | {"auto"}
    assert {info.kind for info in FORMATS.values()} == set(FORMATS) - {"alpaca", "sharegpt"}  # the record kinds


def test_source_kinds_that_need_a_path_agree():
    assert set(PATH_SOURCE_KINDS) == {kind for kind, info in SOURCES.items() if info.needs_path}


def test_every_launcher_has_a_command():
    assert literal_values(LaunchConfig, "launcher") == set(LAUNCHERS)


def test_every_stage_has_a_row():
    assert literal_values(Recipe, "stage") == set(STAGES) == set(STAGE_NAMES)


def test_every_stage_row_names_a_run_function_and_known_formats():
    formats = literal_values(DataConfig, "format")
    for name, info in STAGES.items():
        module, function = info.run.split(":")
        assert importlib.util.find_spec(module) is not None, f"stage {name}: no module {module}"
        assert function in (importlib.util.find_spec(module).loader.get_source(module) or ""), info.run
        assert set(info.formats) <= formats, f"stage {name}: unknown formats {set(info.formats) - formats}"


def test_every_stage_has_an_eval_row_that_scores_what_the_stage_trains_on():
    from ftl.evaluate.by_stage import BY_STAGE

    assert set(BY_STAGE) == set(STAGES)
    for name, info in STAGES.items():  # `ftl eval RUN` scores the run's own split in the run's format
        assert set(info.formats) <= set(BY_STAGE[name].formats), name
        assert info.policy == (BY_STAGE[name].name == "policy"), name  # what a pipeline's judge re-scores


def test_every_method_kind_has_a_row_with_every_column():
    assert literal_values(MethodConfig, "kind") == set(METHODS) == set(METHOD_KINDS)
    columns = {f.name for f in dataclasses.fields(MethodInfo)}
    for kind, info in METHODS.items():
        assert callable(info.apply), kind
        assert info.quant_bits in (None, 4, 8) and info.plan_family in ("full", "lora", "qlora"), kind
        assert {c for c in columns if getattr(info, c) is not None} >= columns - {"quant_bits"}, kind


def test_a_method_row_missing_a_column_fails_at_import():
    with pytest.raises(TypeError, match="missing"):
        MethodInfo(apply=lambda model, cfg, **_: model, quant_bits=None, packs=True, mergeable=False,
                   plan_family="lora")  # no disabled_adapter_reference


def test_stage_table_refuses_a_recipe_with_the_wrong_data_format(tmp_path):
    from ftl.errors import RecipeError
    from ftl.config import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nstage: reward\ndata: {source: {kind: jsonl, path: x.jsonl}, format: chat}\n")
    with pytest.raises(RecipeError, match=r"stage 'reward' trains on data.format 'preference'.*not 'chat'"):
        load_recipe(recipe)


def test_every_advantage_estimator_has_a_row():
    from ftl.config.schema import ADVANTAGE_ESTIMATORS, PPOConfig
    from ftl.rl.advantages import ESTIMATORS

    assert literal_values(PPOConfig, "advantage") == set(ESTIMATORS) == set(ADVANTAGE_ESTIMATORS)
    assert PPOConfig().advantage == "gae" and ESTIMATORS["gae"].value_model  # the default: PPO with its critic
    assert not ESTIMATORS["rloo"].value_model and not ESTIMATORS["reinforce_pp"].value_model
