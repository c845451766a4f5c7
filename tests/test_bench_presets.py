"""The bench presets: the 0.5b model's shape and the synthetic pairs' lengths (no training)."""

from __future__ import annotations

import json
import re
import statistics

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from benchmarks.make_model import preset_config
from benchmarks.synthetic import write_synthetic_pairs
from dpoflow.data_checks.suite import CONTROL_CHARS


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\x07": 4}  # one control "word"
    vocab.update({f"w{k}": k + 5 for k in range(200)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def test_the_05b_preset_is_a_half_billion_parameter_qwen2():
    config = preset_config("0.5b", _tokenizer(), max_positions=1024)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert config.model_type == "qwen2" and config.num_key_value_heads == 2
    assert 0.49e9 < sum(p.numel() for p in model.parameters()) < 0.50e9


def test_synthetic_pairs_follow_the_lengths_and_fit(tmp_path):
    tokenizer = _tokenizer()
    out = tmp_path / "pairs.jsonl"
    stats = write_synthetic_pairs(
        out,
        tokenizer,
        n_pairs=200,
        prompt_median=60,
        answer_median=20,
        max_length=128,
        max_prompt_length=96,
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200

    def n(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    prompts = [n(r["prompt"]) for r in rows]
    answers = [n(r[k]) for r in rows for k in ("chosen", "rejected")]
    assert 50 <= statistics.median(prompts) <= 70 and 16 <= statistics.median(answers) <= 24
    assert max(prompts) <= 95 and max(prompts) > 80  # a tail, clipped to max_prompt_length
    # prompt (+ bos) + answer (+ eos) never exceeds max_length: nothing gets truncated
    assert all(n(r["prompt"]) + n(r[k]) + 2 <= 128 for r in rows for k in ("chosen", "rejected"))
    assert stats["prompt_median"] == statistics.median(prompts)
    # no control characters (the data checks refuse them)
    assert not any(re.search(CONTROL_CHARS, r[k]) for r in rows for k in r)


def test_bench_layout_and_preset_mistakes_are_one_sentence():
    from typer.testing import CliRunner

    from benchmarks.cli import bench_app

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(bench_app, ["dpo", *args])
        # typer boxes its error message and wraps it: one line of words to search
        return result.exit_code, " ".join(result.output.replace("│", " ").split())

    code, text = run("--preset", "0.5b", "--packing", "padded,flat")
    assert code == 2 and "use one or more of padded, packed, shared_prompt" in text
    code, text = run("--preset", "7b")
    assert code == 2 and "unknown preset '7b': use one of 0.5b" in text
    code, text = run("--preset", "0.5b", "--data", "x.jsonl")
    assert code == 2 and "leave out --model and --data" in text
    code, text = run("--steps", "2")
    assert code == 2 and "give --model and --data, or --preset" in text
