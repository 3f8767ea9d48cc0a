"""Named refusals around models: adapter target modules that match nothing, `ftl eval --format` typos,
`ftl merge` on a run that has no final model. Each is one `ftl: error:` line, never a traceback."""

import pytest
import yaml

from conftest import tiny_recipe_dict
from ftl.cli import main
from ftl.config.schema import MethodConfig
from ftl.errors import RecipeError
from ftl.methods import apply_method

LLAMA_LINEAR = "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"


def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64))


def tiny_bert():
    from transformers import AutoModelForSequenceClassification, BertConfig

    return AutoModelForSequenceClassification.from_config(BertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64, num_labels=2))


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as code:
        main(argv)
    err = capsys.readouterr().err
    assert code.value.code == 2 and "Traceback" not in err and err.count("ftl: error:") == 1, err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_lora_targets_that_match_nothing_list_the_linear_layers(kind):
    cfg = MethodConfig.model_validate({"kind": kind, "lora": {"target_modules": ["q_proj", "qkv", "mlp.fc1"]}})
    with pytest.raises(RecipeError) as err:
        apply_method(tiny_llama(), cfg)
    assert str(err.value) == (f"method.lora.target_modules: ['qkv', 'mlp.fc1'] match no module of "
                              f"LlamaForCausalLM; its linear layers are {LLAMA_LINEAR}")


def test_lora_targets_by_short_or_dotted_name_still_apply():
    cfg = MethodConfig.model_validate({"kind": "lora", "lora": {"target_modules": ["q_proj", "mlp.down_proj"]}})
    adapted = {name.rsplit(".", 1)[-1] for name, module in apply_method(tiny_llama(), cfg).named_modules()
               if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "down_proj"}


def test_ia3_defaults_on_a_bert_model_are_refused_with_its_layer_names():
    with pytest.raises(RecipeError, match=r"method.ia3.target_modules: \['k_proj', 'v_proj', 'down_proj'\] match "
                                          r"no module of BertForSequenceClassification; its linear layers are "
                                          r"\['classifier', 'dense', 'key', 'query', 'value'\]"):
        apply_method(tiny_bert(), MethodConfig.model_validate({"kind": "ia3"}), task_type="SEQ_CLS")
    cfg = MethodConfig.model_validate({"kind": "ia3", "ia3": {"target_modules": ["key", "value"],
                                                              "feedforward_modules": ["dense"]}})
    with pytest.raises(RecipeError, match=r"method.ia3.feedforward_modules: \['dense'\] are not in "
                                          r"method.ia3.target_modules \['key', 'value'\]"):
        apply_method(tiny_bert(), cfg, task_type="SEQ_CLS")


def test_eval_format_typo_lists_the_formats(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    line = cli_error(["eval", str(tmp_path), "--data", str(data), "--format", "prompt_complete"], capsys)
    assert line == ("ftl: error: --format prompt_complete: not a record format; one of text, chat, "
                    "prompt_completion, preference, classification, prompts, alpaca, sharegpt, auto")
    assert "give both" in cli_error(["eval", str(tmp_path), "--format", "chat"], capsys)


def test_merge_without_a_final_model_asks_whether_the_run_finished(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert cli_error(["merge", str(run)], capsys) == f"ftl: error: {run}: not a run directory (no recipe.yaml)"
    recipe = tiny_recipe_dict(run, method={"kind": "lora"})
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (run / "checkpoints").mkdir()
    assert cli_error(["merge", str(run)], capsys) == \
        f"ftl: error: {run / 'final'}: no trained model to merge (has the run finished?)"
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "recipe.yaml"]  # nothing written or removed
