"""`dpoflow` as a user meets it: help, validate, and errors that are one clear sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

HH = Path(__file__).parent / "data" / "hh_sample.jsonl"


def test_help_lists_the_commands(cli_env):
    proc = run_cli(["--help"], cli_env)
    assert proc.returncode == 0
    for command in ("run", "validate"):
        assert command in proc.stdout


def test_validate_accepts_good_data(cli_env, tmp_path):
    proc = run_cli(
        ["validate", str(HH), "--workdir", str(tmp_path), "--set", "data.min_rows=5"], cli_env
    )
    assert proc.returncode == 0, proc.stderr
    assert "passed validation" in proc.stdout


def test_validate_rejects_bad_data_with_a_table_and_one_sentence(cli_env, tmp_path):
    rows = [json.loads(line) for line in HH.read_text().splitlines()]
    rows[3]["rejected"] = rows[3]["chosen"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(
        ["validate", str(bad), "--workdir", str(tmp_path), "--set", "data.min_rows=5"], cli_env
    )
    assert proc.returncode == 1
    assert "expect_select_column_values_to_be_unique_within_record" in proc.stdout  # the table
    assert "chosen is the same as rejected" in proc.stderr and "rows 3" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_validate_gives_the_validate_stages_verdict(cli_env, tmp_path):
    """`dpoflow validate` checks token lengths with the config's tokenizer, as the stage does:
    the same config gives the same failure from both."""
    config = ["--set", "data.min_rows=5", "--set", "data.severities.max_length=error"]
    config += ["--set", "dpo.max_length=24", "--set", "dpo.max_prompt_length=8"]
    alone = run_cli(["validate", str(HH), "--workdir", str(tmp_path), *config], cli_env)
    stage = run_cli(
        ["run", "--workdir", str(tmp_path), "--until", "validate", "--set", f"data.train={HH}"]
        + config,
        cli_env,
    )
    assert alone.returncode == stage.returncode == 1
    assert "longer than 24 tokens" in alone.stderr and "longer than 24 tokens" in stage.stderr
    verdict = alone.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert verdict.split(" (report:")[0] in stage.stderr


def test_missing_data_file_is_one_sentence(cli_env, tmp_path):
    proc = run_cli(["validate", str(tmp_path / "nope.jsonl"), "--workdir", str(tmp_path)], cli_env)
    assert proc.returncode == 1
    assert "does not exist: check the DATA argument" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # refused before the embedded default was made


@pytest.mark.parametrize("key", ["data.train", "data.eval_prompts"])
def test_a_missing_data_file_in_the_config_is_refused_before_anything_runs(cli_env, tmp_path, key):
    missing = tmp_path / "nope.jsonl"
    work = tmp_path / "work"
    proc = run_cli(["run", "--workdir", str(work), "--set", f"{key}={missing}"], cli_env)
    assert proc.returncode == 1
    assert f"does not exist: check {key} in your config" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not work.exists()  # no Prefect server, no embedded model: nothing was started


def test_an_unknown_until_stage_is_refused_before_anything_runs(cli_env, tmp_path):
    proc = run_cli(["run", "--workdir", str(tmp_path), "--until", "trian"], cli_env)
    assert proc.returncode == 1
    assert "unknown stage 'trian' for --until: choose one of validate, sft," in proc.stderr
    assert not (tmp_path / "stages").exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("dpo.betta=0.1", "unknown config key 'dpo.betta'"),
        ("dpo.max_steps=abc", "config key 'dpo.max_steps' is invalid: Input should be a valid int"),
        ("dpo.beta=0", "config key 'dpo.beta' is invalid: Input should be greater than 0"),
        ("dpo.beta=-0.1", "config key 'dpo.beta' is invalid: Input should be greater than 0"),
        ("sft.learning_rate=0", "'sft.learning_rate' is invalid: Input should be greater than 0"),
        ("dpo.max_length=16", "max_prompt_length (16) must be below max_length (16)"),
        ("model.base=/no/such/model", "model '/no/such/model' does not exist: set model.base"),
        ("distributed.zero_stage=5", "'distributed.zero_stage' is invalid: Input should be 0, 1"),
        ("distributed.num_nodes=2", "num_nodes > 1 needs distributed.hostfile, the list of"),
    ],
)
def test_a_bad_config_is_one_sentence_before_anything_runs(cli_env, tmp_path, override, message):
    proc = run_cli(["run", "--workdir", str(tmp_path / "work"), "--set", override], cli_env)
    assert proc.returncode == 1
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr  # one sentence
    assert not (tmp_path / "work").exists()  # nothing ran: not even the work directory
