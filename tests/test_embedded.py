"""The embedded default: synthetic IMDb-style data, the tiny Llama and the VADER judge."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from dpoflow.data_checks.embedded_imdb import MIN_MARGIN, write_embedded_dataset
from dpoflow.errors import ConfigError
from dpoflow.models.judge_protocol import Judge
from dpoflow.models.judges import VaderJudge, make_judge
from dpoflow.models.tiny_llama import build_tiny_llama
from tests.conftest import python_lines

N_PAIRS = 300
N_EVAL = 64
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[pathlib.Path, dict]:
    out = tmp_path_factory.mktemp("embedded")
    stats = write_embedded_dataset(out, seed=0, n_train_pairs=N_PAIRS, n_eval_prompts=N_EVAL)
    return out, stats


@pytest.fixture(scope="module")
def train_rows(dataset: tuple[pathlib.Path, dict]) -> list[dict]:
    return _read_jsonl(dataset[0] / "train.jsonl")


@pytest.fixture(scope="module")
def eval_rows(dataset: tuple[pathlib.Path, dict]) -> list[dict]:
    return _read_jsonl(dataset[0] / "eval_prompts.jsonl")


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_dataset_is_byte_identical_across_calls(dataset, tmp_path):
    write_embedded_dataset(tmp_path, seed=0, n_train_pairs=N_PAIRS, n_eval_prompts=N_EVAL)
    assert _files(tmp_path) == _files(dataset[0])
    assert sorted(_files(tmp_path)) == ["eval_prompts.jsonl", "train.jsonl"]


def test_dataset_is_byte_identical_across_processes(dataset, tmp_path):
    code = (
        "import pathlib, sys\n"
        "from dpoflow.data_checks.embedded_imdb import write_embedded_dataset\n"
        f"write_embedded_dataset(pathlib.Path(sys.argv[1]), seed=0, n_train_pairs={N_PAIRS},"
        f" n_eval_prompts={N_EVAL})\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO_ROOT, env=env, check=True)
    assert _files(tmp_path) == _files(dataset[0])


def test_other_seed_gives_other_data(dataset, tmp_path):
    write_embedded_dataset(tmp_path, seed=1, n_train_pairs=N_PAIRS, n_eval_prompts=N_EVAL)
    assert _files(tmp_path) != _files(dataset[0])


def test_counts_fields_and_stats(dataset, train_rows, eval_rows):
    _, stats = dataset
    assert len(train_rows) == N_PAIRS
    assert len(eval_rows) == N_EVAL
    assert all(list(row) == ["id", "prompt", "chosen", "rejected"] for row in train_rows)
    assert all(list(row) == ["id", "prompt"] for row in eval_rows)
    assert all(isinstance(v, str) for row in train_rows + eval_rows for v in row.values())
    assert len({row["id"] for row in train_rows}) == N_PAIRS
    assert len({row["prompt"] for row in eval_rows}) == N_EVAL
    assert stats["n_train_pairs"] == N_PAIRS
    assert stats["n_eval_prompts"] == N_EVAL
    assert stats["mean_chosen_vader"] > stats["mean_rejected_vader"] + MIN_MARGIN


def test_pairs_are_distinct(train_rows):
    assert all(row["chosen"] != row["rejected"] for row in train_rows)
    triples = [(row["prompt"], row["chosen"], row["rejected"]) for row in train_rows]
    assert len(set(triples)) == len(triples)


def test_eval_prompts_are_held_out(train_rows, eval_rows):
    train_prompts = {row["prompt"] for row in train_rows}
    assert not train_prompts & {row["prompt"] for row in eval_rows}


def test_prompts_are_short_and_neutral(train_rows, eval_rows):
    judge = VaderJudge()
    prompts = sorted({row["prompt"] for row in train_rows + eval_rows})
    assert all(2 <= len(p.split()) <= 8 for p in prompts)
    assert judge.score(prompts, [""] * len(prompts)) == [0.0] * len(prompts)


def test_answers_continue_the_prompt(train_rows):
    answers = [row[side] for row in train_rows for side in ("chosen", "rejected")]
    assert all(a.startswith(" ") and not a.startswith("  ") for a in answers)
    assert all(a.endswith(".") for a in answers)
    assert all(6 <= len(a.split()) <= 20 for a in answers)


def test_chosen_beats_rejected_by_margin(train_rows):
    judge = make_judge("vader")
    prompts = [row["prompt"] for row in train_rows]
    chosen = judge.score(prompts, [row["chosen"] for row in train_rows])
    rejected = judge.score(prompts, [row["rejected"] for row in train_rows])
    assert all(c - r >= MIN_MARGIN for c, r in zip(chosen, rejected, strict=True))
    negative_rejected = sum(r < 0 for r in rejected) / len(rejected)
    negative_overall = sum(s < 0 for s in chosen + rejected) / (2 * len(rejected))
    assert negative_rejected >= 0.5
    assert 0.3 <= negative_overall <= 0.6  # SFT sees a genuinely mixed distribution


def test_make_judge_rejects_unknown_names():
    assert isinstance(make_judge("vader"), Judge)
    assert make_judge("vader").name == "vader"
    with pytest.raises(ConfigError, match="vader"):
        make_judge("gpt-judge")


def test_vader_judge_orders_sentiment():
    scores = VaderJudge().score(["This movie was"] * 2, [" truly wonderful.", " truly awful."])
    assert scores[0] > 0 > scores[1]
    assert all(-1.0 <= s <= 1.0 for s in scores)


@pytest.fixture(scope="module")
def model_texts(train_rows) -> list[str]:
    return [row["prompt"] + row[side] for row in train_rows for side in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, model_texts) -> pathlib.Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_llama(out, model_texts, seed=0)
    return out


def test_tiny_llama_loads_with_auto_classes(tiny_model_dir, train_rows):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    assert model.config.tie_word_embeddings
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<pad>", "<unk>")
    assert model.config.vocab_size == len(tokenizer) <= 1024

    answer = train_rows[0]["chosen"]
    ids = [tokenizer.bos_token_id, *tokenizer.encode(answer, add_special_tokens=False)]
    ids.append(tokenizer.eos_token_id)
    assert tokenizer.decode(ids, skip_special_tokens=True) == answer


def test_tiny_llama_rebuild_is_identical(tiny_model_dir, model_texts, tmp_path):
    again = tmp_path / "model"
    build_tiny_llama(again, model_texts, seed=0)
    assert _files(again) == _files(tiny_model_dir)
    assert not [p for p in tmp_path.iterdir() if p.name != "model"]  # no temp folders left


def test_tiny_llama_replaces_existing_folder(model_texts, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    build_tiny_llama(out, model_texts[:50], seed=0, hidden_size=32, num_layers=1, num_heads=2)
    assert not (out / "stale.txt").exists()
    assert (out / "config.json").exists()


def test_the_flow_process_imports_torch_only_for_a_stage_that_samples(tmp_path):
    """`dpoflow run`'s own process imports the pipeline, finds the embedded default made and
    formats the evaluation's report: none of that needs torch or transformers (seconds of CPU
    to import), so a run that stops before evaluation, or finds it cached, never loads them."""
    from dpoflow.tasks.sources import ensure_embedded_model

    ensure_embedded_model(tmp_path)  # made here, in the test's process
    lines = python_lines(
        "import sys\n"
        "import dpoflow.flows.pipeline\n"
        "from dpoflow.models.evaluation_report import markdown_report\n"
        "from dpoflow.tasks.sources import ensure_embedded_model\n"
        f"ensure_embedded_model({str(tmp_path)!r})\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    assert lines == ["[]"]
