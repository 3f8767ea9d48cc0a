"""Bad data gets one named error (file, line, what was expected) or, under data.on_bad_row: skip, is
skipped and counted by reason; truncation is counted; the CLI prints `ftl: error:`, never a traceback."""

import json

import pytest

from ftl.cli import main
from ftl.config.schema import DataConfig
from ftl.data import load_splits
from ftl.data.tokenize import EncodeReport, encode_records
from ftl.errors import DataError
from ftl.models.tiny import train_tiny_tokenizer


def data_cfg(path, kind="jsonl", fmt="prompt_completion", **extra):
    return DataConfig.model_validate({"source": {"kind": kind, "path": str(path)}, "format": fmt, **extra})


def pair(i):
    return json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}, ensure_ascii=False)


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet"])
def test_a_folder_where_a_file_belongs_is_named(tmp_path, kind):
    with pytest.raises(DataError, match=rf"data.source.path: {tmp_path} is a folder; source kind '{kind}' "
                                        rf"reads one .{kind} file"):
        load_splits(data_cfg(tmp_path, kind=kind))


def test_a_saved_dataset_must_be_a_folder_save_to_disk_wrote(tmp_path):
    file = write_lines(tmp_path / "d.jsonl", [pair(0)])
    with pytest.raises(DataError, match=r"is a file; source kind 'saved_dataset' reads a folder"):
        load_splits(data_cfg(file, kind="saved_dataset"))
    with pytest.raises(DataError, match=rf"data.source.path: {tmp_path} is not a saved dataset"):
        load_splits(data_cfg(tmp_path, kind="saved_dataset"))


def test_a_file_that_is_not_parquet_is_named(tmp_path):
    path = write_lines(tmp_path / "d.parquet", [pair(0)])
    with pytest.raises(DataError, match=rf"{path}: not a readable parquet file"):
        load_splits(data_cfg(path, kind="parquet"))


def test_non_utf8_line_is_named_with_its_byte(tmp_path):
    latin1 = json.dumps({"prompt": "café", "completion": "x"}, ensure_ascii=False).encode("latin-1")
    path = write_lines(tmp_path / "d.jsonl", [pair(0), latin1])
    with pytest.raises(DataError, match=rf"{path}:2: not UTF-8 \(byte 0xe9 at byte 16 of the line; "
                                        r"data files are read as UTF-8"):
        load_splits(data_cfg(path))


def test_non_utf8_csv_and_json_name_the_line(tmp_path):
    csv_path = write_lines(tmp_path / "d.csv", [b"text,label", b"good,0", b"caf\xe9,1", b"more,0"])
    with pytest.raises(DataError, match=rf"{csv_path}:3: not UTF-8 \(byte 0xe9 at byte 4 of the line"):
        load_splits(data_cfg(csv_path, kind="csv", fmt="classification", on_bad_row="skip"))
    json_path = write_lines(tmp_path / "d.json",
                            [b"[", b'{"text": "ok", "label": 0},', b'{"text": "caf\xe9", "label": 1}]'])
    with pytest.raises(DataError, match=rf"{json_path}:3: not UTF-8 \(byte 0xe9 at byte 14 of the line"):
        load_splits(data_cfg(json_path, kind="json", fmt="classification"))


def test_skip_mode_counts_undecodable_and_invalid_json_lines_by_reason(tmp_path):
    lines = [pair(i) for i in range(12)]
    lines[2] = '{"prompt": "x", '
    lines[5] = '{"prompt": "y"'
    lines[8] = pair(8).replace("answer", "r\u00e9ponse").encode("latin-1")
    lines[10] = json.dumps({"prompt": "z"})
    path = write_lines(tmp_path / "d.jsonl", lines)
    splits, report = load_splits(data_cfg(path, on_bad_row="skip"))
    assert report.read == 12 and report.kept == 8 and sum(splits.sizes().values()) == 8
    assert dict(report.skipped) == {"not valid JSON": 2, "not UTF-8": 1, "missing field 'completion'": 1}
    assert report.first_skipped[0].startswith(f"{path}:3: not valid JSON (")
    assert report.first_skipped[2].startswith(f"{path}:9: not UTF-8 (byte 0xe9")
    assert report.as_manifest()["rows"]["skipped"] == dict(report.skipped)  # what the manifest records as data.rows


def test_when_every_row_is_rejected_the_error_gives_reasons_and_first_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"prompt": "a"}', '{"prompt": "b"}', "not json", '{"prompt": ""}'])
    with pytest.raises(DataError) as err:
        load_splits(data_cfg(path, on_bad_row="skip"))
    message = str(err.value)
    assert f"every row of jsonl source {path} was rejected (4 read; skipped: " in message
    assert "missing field 'completion' (2 rows)" in message and "not valid JSON (1 row)" in message
    assert f"first: {path}:1: missing field 'completion'; {path}:2: missing field 'completion'; {path}:3:" in message


def test_an_empty_file_says_it_holds_no_rows(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["", "  "])
    with pytest.raises(DataError, match=rf"data: jsonl source {path} holds no rows"):
        load_splits(data_cfg(path))


def test_byte_order_mark_and_multiline_csv_fields_read_cleanly(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + f"{pair(0)}\n{pair(1)}\n".encode())
    splits, _ = load_splits(data_cfg(jsonl))
    assert len(splits.train + splits.validation + splits.test) == 2
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b'\xef\xbb\xbftext,label\n"two\nlines",0\none,1\n,1\n')
    with pytest.raises(DataError, match=rf"{csv_path}:5: field 'text' is empty"):  # the row after the 2-line one
        load_splits(data_cfg(csv_path, kind="csv", fmt="classification"))


def test_encode_report_counts_truncated_and_dropped_examples():
    tokenizer = train_tiny_tokenizer(["a short prompt", "a long answer " * 20] * 5, 300)
    tokenizer.chat_template = None
    data = DataConfig.model_validate({"source": {"kind": "chatterbot"}, "format": "prompt_completion",
                                      "max_length": 12})
    records = [{"prompt": "a short prompt", "completion": "ok"},                 # fits
               {"prompt": "a short prompt", "completion": "a long answer " * 5},  # cut, still learns
               {"prompt": "a long answer " * 10, "completion": "ok"}]            # cut before the answer
    report = EncodeReport()
    features = encode_records(tokenizer, records, data, report)
    assert len(features) == 2
    assert report.as_dict() == {"encoded": 3, "truncated": 2, "dropped_nothing_to_learn": 1}
    assert encode_records(tokenizer, records, data) == features  # same features without a report


def test_cli_prints_one_error_line_for_bad_data(tmp_path, capsys):
    from conftest import tiny_recipe_dict, write_recipe

    recipe = tiny_recipe_dict(tmp_path / "run", data={"source": {"kind": "jsonl", "path": str(tmp_path)},
                                                      "format": "prompt_completion"})
    with pytest.raises(SystemExit) as code:
        main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    err = capsys.readouterr().err
    assert code.value.code == 2 and "Traceback" not in err and err.count("ftl: error:") == 1
    assert err.strip().splitlines()[-1] == \
        f"ftl: error: data.source.path: {tmp_path} is a folder; source kind 'jsonl' reads one .jsonl file"
