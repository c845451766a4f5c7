"""Loading and validating preference data: every format, every shape, every bad input.

Each bad-input test asserts that the message names the cause (file, column, expectation),
because a user reading it must be able to fix the data without a traceback.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pandas as pd
import pytest

from dpoflow.data_checks.loading import example_id, load_preferences, load_prompts
from dpoflow.data_checks.suite import render_failures_table, validate_preferences
from dpoflow.errors import ConfigError, DataError

DATA = Path(__file__).parent / "data"
ROWS = [
    {"prompt": f"question {i}?", "chosen": f"a helpful answer {i}.", "rejected": f"meh {i}"}
    for i in range(6)
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def frame(rows: list[dict]) -> pd.DataFrame:
    """A frame with raw (object) values, as the loader returns them."""
    return pd.DataFrame({k: pd.Series([r[k] for r in rows], dtype=object) for k in rows[0]})


def failed(report, check: str):
    outcomes = [o for o in report.failures() if o.check == check]
    assert outcomes, f"expected check {check!r} to fail; failures: {report.failures()}"
    return outcomes


def tiny_tokenizer(chat_template: str | None = None):
    """A whitespace word-level tokenizer built offline: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


# --------------------------------------------------------------------------- formats


def test_load_jsonl(tmp_path):
    df = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", ROWS)))
    assert list(df.columns) == ["id", "prompt", "chosen", "rejected"]
    assert df["prompt"].tolist() == [r["prompt"] for r in ROWS]
    assert df["id"].iloc[0] == example_id(**ROWS[0])
    assert len(df["id"].iloc[0]) == 16


def test_load_json_list_and_data_key(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "b.json").write_text(json.dumps({"data": ROWS}))
    a = load_preferences(str(tmp_path / "a.json"))
    b = load_preferences(str(tmp_path / "b.json"))
    assert a.equals(b) and len(a) == len(ROWS)


def test_load_csv_keeps_text(tmp_path):
    rows = [dict(r, id=f"ex-{i}") for i, r in enumerate(ROWS)]
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    df = load_preferences(str(tmp_path / "p.csv"))
    assert df["id"].tolist() == [f"ex-{i}" for i in range(len(ROWS))]
    assert df["chosen"].tolist() == [r["chosen"] for r in ROWS]


def test_load_parquet(tmp_path):
    pd.DataFrame(ROWS).to_parquet(tmp_path / "p.parquet")
    df = load_preferences(str(tmp_path / "p.parquet"))
    assert df["rejected"].tolist() == [r["rejected"] for r in ROWS]


def test_load_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dict")
    )
    assert len(load_preferences(str(tmp_path / "single"))) == len(ROWS)
    assert len(load_preferences(str(tmp_path / "dict"), split="test")) == 2
    with pytest.raises(DataError, match="no split 'valid'.*'train', 'test'"):
        load_preferences(str(tmp_path / "dict"), split="valid")


def test_column_mapping(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in ROWS]
    path = str(write_jsonl(tmp_path / "m.jsonl", rows))
    df = load_preferences(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert df["prompt"].tolist() == [r["prompt"] for r in ROWS]
    with pytest.raises(DataError, match="no column\\(s\\) 'answer' named in data.columns"):
        load_preferences(path, columns={"prompt": "question", "chosen": "answer"})
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'score'"):
        load_preferences(path, columns={"score": "good"})


def test_load_prompts_from_prompt_and_preference_files(tmp_path):
    prompts = write_jsonl(tmp_path / "eval.jsonl", [{"text": "hi"}, {"text": "bye"}])
    assert load_prompts(str(prompts), column="text")["prompt"].tolist() == ["hi", "bye"]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", ROWS + ROWS[:2])
    df = load_prompts(str(pairs))
    assert df["prompt"].tolist() == [r["prompt"] for r in ROWS]
    # A preference file's chosen answers come along: the evaluation can judge against them.
    assert list(df.columns) == ["id", "prompt", "chosen"]
    assert df["chosen"].tolist() == [r["chosen"] for r in ROWS]


# --------------------------------------------------------------------------- shapes


def test_hh_sample_splits_prompt_and_validates():
    df = load_preferences(str(DATA / "hh_sample.jsonl"))
    assert len(df) == 20
    assert all(p.endswith("\n\nAssistant:") for p in df["prompt"])
    assert not any("\n\nHuman:" in c for c in df["chosen"])
    assert df["chosen"].iloc[0].startswith(" A good first step")
    report = validate_preferences(df)
    assert report.success, report.summary_message()


def test_ultrafeedback_sample_fallback_template_and_validates():
    df = load_preferences(str(DATA / "ultrafeedback_sample.jsonl"))
    assert len(df) == 20
    assert df["prompt"].iloc[0] == "user: How do I get started with baking bread?\nassistant:"
    assert df["chosen"].iloc[0].startswith(" To get started")
    report = validate_preferences(df)
    assert report.success, report.summary_message()


def test_conversational_uses_tokenizer_chat_template(tmp_path):
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    rows = [
        {
            "prompt": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        }
    ]
    path = str(write_jsonl(tmp_path / "conv.jsonl", rows))
    df = load_preferences(path, tokenizer=tiny_tokenizer(template))
    assert df["prompt"].iloc[0] == "<|system|>be brief\n<|user|>hi\n<|assistant|>"
    assert df[["chosen", "rejected"]].iloc[0].tolist() == ["hello", "go away"]


# --------------------------------------------------------------------------- bad inputs: load


def test_missing_file_names_path(tmp_path):
    with pytest.raises(
        DataError, match="data file '.*nope.jsonl' does not exist: check data.train"
    ):
        load_preferences(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="does not exist"):
        load_preferences("not a hub name")
    # The evaluation prompts are named by their own key.
    with pytest.raises(DataError, match="does not exist: check data.eval_prompts in your config"):
        load_prompts(str(tmp_path / "nope.jsonl"))


def test_file_not_its_format(tmp_path):
    (tmp_path / "fake.parquet").write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(DataError, match="'.*fake.parquet' is not a readable Parquet file"):
        load_preferences(str(tmp_path / "fake.parquet"))
    (tmp_path / "fake.jsonl").write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(DataError, match="not valid JSON Lines \\(line 1"):
        load_preferences(str(tmp_path / "fake.jsonl"))
    write_jsonl(tmp_path / "lines.json", ROWS)
    with pytest.raises(DataError, match="not valid JSON .*rename it to .jsonl"):
        load_preferences(str(tmp_path / "lines.json"))


def test_missing_columns_named_with_present_ones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"question": "q", "chosen": "a", "bad": "b"}])
    with pytest.raises(DataError) as err:
        load_preferences(str(path))
    message = str(err.value)
    assert "missing column(s) 'prompt', 'rejected'" in message
    assert "(found: 'question', 'chosen', 'bad')" in message
    assert "data.columns" in message


def test_bytes_not_utf8_named_with_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "ok", "chosen": "a", "rejected": "b"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="is not valid UTF-8 \\(byte offset 64, line 2\\)"):
        load_preferences(str(path))


def test_zero_rows(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="'.*empty.jsonl' has no rows"):
        load_preferences(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(DataError, match="has no rows"):
        load_preferences(str(tmp_path / "empty.json"), columns={})
    report = validate_preferences(frame(ROWS).iloc[0:0])
    assert report.success is False
    assert failed(report, "min_rows")[0].name == "expect_table_row_count_to_be_between"


# --------------------------------------------------------------------------- bad inputs: suite


def test_non_text_values_reported_not_crashed(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[1]["chosen"] = 42
    rows[2]["rejected"] = ["a", "list"]
    rows[3]["prompt"] = {"a": "dict"}
    df = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    assert df["chosen"].iloc[1] == 42  # kept raw, not coerced to "42"
    report = validate_preferences(df)
    assert report.success is False
    by_column = {o.column: o for o in failed(report, "is_text")}
    assert by_column["chosen"].examples == [1]
    assert by_column["rejected"].examples == [2]
    assert by_column["prompt"].examples == [3]
    assert by_column["chosen"].name == "expect_column_values_to_be_of_type"
    assert "on column 'chosen' for 1 of 6 rows (rows 1)" in report.summary_message()


def test_none_and_nan_reported(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["chosen"] = None
    df = load_preferences(str(write_jsonl(tmp_path / "p.jsonl", rows)))
    df.loc[4, "rejected"] = math.nan
    report = validate_preferences(df)
    assert report.success is False
    nulls = {o.column: o.examples for o in failed(report, "not_null")}
    assert nulls == {"chosen": [0], "rejected": [4]}
    assert "expect_column_values_to_not_be_null failed on column 'chosen'" in (
        report.summary_message()
    )


def test_empty_and_whitespace_strings_reported(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[2]["chosen"] = ""
    rows[5]["chosen"] = " \n\t "
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)
    df = load_preferences(str(tmp_path / "p.csv"))  # empty CSV cell stays "", not NaN
    report = validate_preferences(df)
    assert report.success is False
    (outcome,) = failed(report, "not_empty")
    assert (outcome.column, outcome.examples) == ("chosen", [2, 5])
    assert (
        "expect_column_value_lengths_to_be_between failed on column 'chosen' for 2 of 6 rows "
        "(rows 2, 5): empty or whitespace-only text; fix or drop those rows."
    ) in report.summary_message()


def test_control_characters_reported():
    rows = [dict(r) for r in ROWS]
    rows[3]["prompt"] = "bell\x07 here"
    rows[4]["prompt"] = "new\nline\tand tab are fine"
    report = validate_preferences(frame(rows))
    (outcome,) = failed(report, "no_control_chars")
    assert (outcome.column, outcome.examples) == ("prompt", [3])


def test_single_10mb_string_is_allowed_quickly_unless_max_length():
    rows = [dict(r) for r in ROWS]
    rows[0]["chosen"] = "word " * 2_000_000  # 10 MB
    start = time.perf_counter()
    report = validate_preferences(frame(rows))
    assert time.perf_counter() - start < 10
    assert report.success, report.summary_message()  # allowed by default
    assert failed(report, "length_ratio")[0].severity == "warning"

    start = time.perf_counter()
    report = validate_preferences(frame(rows), tokenizer=tiny_tokenizer(), max_length=64)
    assert time.perf_counter() - start < 10
    (outcome,) = failed(report, "max_length")
    assert (outcome.severity, outcome.examples) == ("warning", [0])
    assert report.success  # a warning by default ...
    strict = validate_preferences(
        frame(rows), tokenizer=tiny_tokenizer(), max_length=64, severities={"max_length": "error"}
    )
    assert strict.success is False  # ... an error when configured so


def test_duplicated_rows_reported():
    report = validate_preferences(frame(ROWS + [ROWS[1]]))
    assert report.success is False
    (outcome,) = failed(report, "unique_rows")
    assert outcome.name == "expect_compound_columns_to_be_unique"
    assert outcome.examples == [1, 6]


def test_chosen_equal_to_rejected_reported():
    rows = [dict(r) for r in ROWS]
    rows[2]["rejected"] = rows[2]["chosen"]
    report = validate_preferences(frame(rows))
    assert report.success is False
    (outcome,) = failed(report, "chosen_differs")
    assert outcome.name == "expect_select_column_values_to_be_unique_within_record"
    assert outcome.examples == [2]
    assert "on columns 'chosen', 'rejected' for 1 of 6 rows (rows 2)" in report.summary_message()


def test_eval_prompt_leakage_reported():
    report = validate_preferences(frame(ROWS), eval_prompts=["  question 4? ", "unrelated"])
    assert report.success is False
    (outcome,) = failed(report, "no_eval_leakage")
    assert (outcome.name, outcome.column) == ("expect_column_values_to_not_be_in_set", "prompt")
    assert outcome.examples == [4]


def test_missing_column_in_frame_reported_not_crashed():
    report = validate_preferences(frame(ROWS).drop(columns=["rejected"]))
    assert report.success is False
    (outcome,) = failed(report, "required_columns")
    assert (outcome.name, outcome.column) == ("expect_column_to_exist", "rejected")


def test_severities_validated():
    with pytest.raises(ConfigError, match="unknown check 'nulls'"):
        validate_preferences(frame(ROWS), severities={"nulls": "error"})
    with pytest.raises(ConfigError, match="'fatal': set it to 'error' or 'warning'"):
        validate_preferences(frame(ROWS), severities={"not_null": "fatal"})


def test_data_docs_written_to_report_dir(tmp_path):
    rows = [dict(r) for r in ROWS]
    rows[0]["chosen"] = ""
    report = validate_preferences(frame(rows), report_dir=tmp_path / "docs")
    assert report.success is False
    assert report.data_docs_dir == str(tmp_path / "docs")
    assert (tmp_path / "docs" / "index.html").is_file()
    assert list((tmp_path / "docs" / "validations").rglob("*.html"))
    saved = json.loads((tmp_path / "docs" / "validation.json").read_text())
    assert saved["success"] is False and saved["n_rows"] == 6
    assert any(o["check"] == "not_empty" and not o["success"] for o in saved["outcomes"])
    # The paths it names are relative to it, so they exist wherever the folder goes.
    assert (tmp_path / "docs" / saved["data_docs"]).is_file()
    page = (tmp_path / "docs" / saved["summary_page"]).read_text()
    # One page with its styles inline (MLflow shows it alone): no stylesheet or script to load.
    assert "<style>" in page and "<link" not in page and "<script" not in page
    assert page.count('class="failed"') >= 2 and "expect_column_value_lengths" in page
    # A passed check reads as passed, not in the words of the problem it looks for.
    passed = next(o for o in saved["outcomes"] if o["check"] == "not_null")
    assert passed["success"] and passed["detail"].startswith("passed")


def test_render_failures_table():
    from rich.console import Console

    report = validate_preferences(frame(ROWS + [ROWS[0]]))
    console = Console(width=200, record=True)
    console.print(render_failures_table(report))
    text = console.export_text()
    assert "expect_compound_columns_to_be_unique" in text and "0, 6" in text
