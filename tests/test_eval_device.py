"""`ftl eval` evaluates on the model's device (issue #14, finding 6): the device decision, its refusal,
4/8-bit models left where bitsandbytes loaded them, batches sent to the model's device, eval.json's record."""

import json

import pytest
import torch

from ftl.cli import main
from ftl.errors import LaunchError
from ftl.evaluate.sharded import sum_over_ranks

# ftl.evaluate.device is imported inside the tests: each test then fails on its own on code without it


@pytest.mark.parametrize("requested, cuda, expected", [
    ("auto", True, "cuda"), ("auto", False, "cpu"),
    ("cpu", True, "cpu"), ("cpu", False, "cpu"),
    ("cuda", True, "cuda"),
])
def test_eval_device_table(requested, cuda, expected):
    from ftl.evaluate.device import eval_device

    assert eval_device(requested, cuda) == torch.device(expected)


def test_eval_device_refuses_cuda_without_cuda():
    from ftl.evaluate.device import eval_device

    with pytest.raises(LaunchError, match="--device cuda but torch .* sees no CUDA device"):
        eval_device("cuda", False)


def test_cli_refuses_cuda_without_cuda_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as code:
        main(["eval", str(tmp_path), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code.value.code == 2 and "Traceback" not in err and err.count("ftl: error:") == 1, err
    assert err.strip().splitlines()[-1].startswith("ftl: error: --device cuda but torch"), err


@pytest.mark.parametrize("marker", [{"hf_quantizer": object()}, {"is_loaded_in_4bit": True},
                                    {"is_loaded_in_8bit": True}])
def test_place_leaves_a_quantized_model_where_it_was_loaded(marker):
    from ftl.evaluate.device import place

    model = torch.nn.Linear(2, 2)
    for name, value in marker.items():
        setattr(model, name, value)
    assert place(model, torch.device("meta")) is model
    assert model.weight.device == torch.device("cpu")


def test_place_moves_a_plain_model():
    from ftl.evaluate.device import place

    assert place(torch.nn.Linear(2, 2), torch.device("meta")).weight.device == torch.device("meta")


def test_batches_go_to_the_models_device_without_an_accelerator():
    model = torch.nn.Linear(2, 2, device="meta")  # neither CPU nor anything hard-coded
    seen = []

    def measure(batch):
        seen.append(batch["x"].device)
        return torch.ones(1)

    features = [{"x": [1.0, 2.0]}] * 3
    sum_over_ranks(model, features, 2, lambda rows: {"x": torch.tensor([r["x"] for r in rows])}, measure, 1)
    assert seen == [torch.device("meta")] * 2


def test_eval_json_records_the_device(tmp_path, monkeypatch):
    from ftl.config.schema import TinyModelConfig
    from ftl.evaluate.target import evaluate_target
    from ftl.models.tiny import build_tiny_model, train_tiny_tokenizer

    records = [{"prompt": f"What is {i} plus {i}?", "completion": f"It is {2 * i}."} for i in range(4)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = train_tiny_tokenizer([r["prompt"] + " " + r["completion"] for r in records] * 4, 300)
    build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=64, vocab_size=300), tokenizer,
                     seed=0).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto means CPU on a machine without CUDA
    evaluate_target(str(tmp_path / "model"), data=str(data), fmt="prompt_completion", out=str(tmp_path / "out"),
                    max_new_tokens=2, samples=1, device="auto")
    report = json.loads((tmp_path / "out" / "eval.json").read_text())["eval"]
    assert report["device"] == "cpu" and report["examples"] == 4 and report["tokens"] > 0
