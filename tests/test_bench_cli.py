"""`python -m benchmarks` on a user's own preference file: read, checked and refused as the
pipeline reads, checks and refuses it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

DATA = Path(__file__).parent / "data"
HH = DATA / "hh_sample.jsonl"
TINY = ["--steps", "1", "--warmup", "1", "--batch-size", "4", "--max-length", "64"]
TINY += ["--max-prompt-length", "16"]


def run_bench(args: list[str], env: dict[str, str]):
    """`python -m benchmarks ARGS`: the benchmarks run from a checkout, outside the product."""
    return run_cli(args, env, module="benchmarks")


@pytest.fixture(scope="module")
def model_and_rows(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The embedded tiny model and 12 plain pairs (prompt, chosen, rejected; no ids)."""
    from dpoflow.tasks.sources import ensure_embedded_data, ensure_embedded_model

    work = tmp_path_factory.mktemp("bench-model")
    model = ensure_embedded_model(work)
    lines = (ensure_embedded_data(work) / "train.jsonl").read_text().splitlines()[:12]
    rows = [{k: json.loads(line)[k] for k in ("prompt", "chosen", "rejected")} for line in lines]
    return model, rows


def test_bench_mistakes_are_one_sentence(cli_env, tmp_path, model_and_rows):
    model, _ = model_and_rows
    proc = run_bench(["dpo", "--model", str(tmp_path / "none"), "--data", str(HH)], cli_env)
    assert proc.returncode == 2 and "'--model'" in proc.stderr and "does not exist" in proc.stderr
    # A folder the pipeline's loader cannot read: the pipeline's sentence.
    proc = run_bench(["dpo", "--model", str(tmp_path), "--data", str(HH)], cli_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has no config.json: point model.base at a folder saved with" in proc.stderr
    proc = run_bench(["dpo", "--model", str(model), "--data", str(HH)], cli_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has 20 pairs but (--warmup + --steps) x --batch-size needs 368" in proc.stderr
    if not torch.cuda.is_available():  # a GPU machine would run the bench
        cuda = ["--model", str(tmp_path), "--data", str(HH), "--device", "cuda"]
        proc = run_bench(["dpo", *cuda], cli_env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "sees no GPU" in proc.stderr
        # QLoRA: adapters on a 4-bit base, on a GPU; refused before anything is built.
        qlora = ["dpo", "--model", str(model), "--data", str(HH), "--load-in-4bit"]
        proc = run_bench(qlora, cli_env)
        assert proc.returncode == 2 and "cannot be fine-tuned fully: give --lora-r" in proc.stderr
        proc = run_bench([*qlora, "--lora-r", "4"], cli_env)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "trains on a CUDA GPU and this bench runs on the CPU" in proc.stderr


def write_csv(path: Path, rows: list[dict], names: dict[str, str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(names.values()))
        writer.writeheader()
        writer.writerows({names[k]: row[k] for k in names} for row in rows)
    return path


def conversational(rows: list[dict]) -> list[dict]:
    """UltraFeedback's shape: each answer a message list that repeats the user's turn."""

    def turns(prompt: str, answer: str) -> list[dict]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    return [
        {
            "prompt": r["prompt"],
            "chosen": turns(r["prompt"], r["chosen"]),
            "rejected": turns(r["prompt"], r["rejected"]),
        }
        for r in rows
    ]


def users_file(shape: str, rows: list[dict], folder: Path) -> tuple[Path, dict[str, str]]:
    """The rows as a user may write them: (the file, its --columns mapping)."""
    if shape == "plain jsonl":  # no id column, as a user writes it
        data = folder / "prefs.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return data, {}
    if shape == "csv with other names":
        names = {"prompt": "question", "chosen": "good", "rejected": "bad"}
        return write_csv(folder / "prefs.csv", rows, names), names
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in conversational(rows)))
    return data, {}


def test_a_csv_with_other_names_gives_the_bench_the_pairs_of_plain_jsonl(tmp_path, model_and_rows):
    """What the bench trains on is the file `write_subset` writes (read and checked as the
    validate stage does): byte for byte the same from a CSV with its own column names
    (--columns) as from plain jsonl, so the bench run below on the CSV covers both."""
    from benchmarks.dpo_bench import write_subset

    model, rows = model_and_rows
    subsets = []
    for i, shape in enumerate(["plain jsonl", "csv with other names"]):
        data, columns = users_file(shape, rows, tmp_path)
        spec = {"model": str(model), "data": str(data), "columns": columns, "max_length": 64}
        subsets.append(write_subset(spec, 8, tmp_path / f"subset-{i}.jsonl").read_text())
    assert subsets[0].count("\n") == 8 and subsets[1] == subsets[0]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["csv with other names", "conversational"])
def test_bench_trains_on_a_users_file(cli_env, tmp_path, model_and_rows, shape):
    """A CSV with its own column names (mapped with --columns), and conversational rows
    (message lists, rendered as the pipeline renders them: other prompts, other ids)."""
    model, rows = model_and_rows
    data, names = users_file(shape, rows, tmp_path)
    args = [arg for k, v in names.items() for arg in ("--columns", f"{k}={v}")]
    out = tmp_path / "bench.json"
    cmd = ["dpo", "--model", str(model), "--data", str(data), *TINY, *args, "--json", str(out)]
    proc = run_bench(cmd, cli_env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ours"]["pairs_per_s"] > 0 and report["ours"]["tokens_per_s"] > 0
    assert len(report["ours"]["losses"]) == 2 and all(v == v for v in report["ours"]["losses"])


def test_bench_refuses_a_file_the_pipeline_refuses(cli_env, tmp_path, model_and_rows):
    model, rows = model_and_rows
    rows = [dict(r) for r in rows]
    rows[3]["rejected"] = rows[3]["chosen"]
    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_bench(["dpo", "--model", str(model), "--data", str(data), *TINY], cli_env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    # The validate stage's sentence (see test_cli's validate tests).
    assert "chosen is the same as rejected" in proc.stderr and "rows 3" in proc.stderr
