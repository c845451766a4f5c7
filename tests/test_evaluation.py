"""Win rate, sampled KL, generation and the end-to-end evaluation on a tiny random Llama."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from dpoflow.errors import ModelError
from dpoflow.models.evaluation import (
    JudgedLog,
    estimate_kl,
    evaluate_policy,
    kl_terms,
    win_rate,
)
from dpoflow.models.evaluation_report import markdown_report
from dpoflow.models.generation import generate, load_causal_lm, sample

SENTENCES = [
    "this movie was great and i loved every minute of it",
    "the film was terrible and boring from start to end",
    "what a wonderful story with great actors and music",
    "i hated the plot because it was slow and awful",
    "a fine movie for a rainy day with friends",
]
PROMPTS = ["this movie was", "the film", "what a wonderful story with great actors", "i", "a"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer fitted on SENTENCES, with the pipeline's special tokens."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def make_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


def save_tiny_model(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random Llama and its tokenizer to `directory`, as a trained model would be."""
    tokenizer = make_tokenizer()
    make_model(tokenizer, seed).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return make_model(tokenizer)


class LengthJudge:
    """Prefers longer answers: deterministic and independent of any model."""

    name = "length"

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [float(len(answer.split())) for answer in answers]


def test_win_rate_counts_ties_as_half_and_uses_wilson():
    policy = [1.0] * 8 + [0.5, 0.0]
    reference = [0.0] * 8 + [0.5, 1.0]
    result = win_rate(policy, reference)
    assert (result.wins, result.ties, result.losses, result.n) == (8, 1, 1, 10)
    assert result.rate == pytest.approx(0.85)
    # Wilson by hand: p = 0.85, n = 10, z = 1.96, z^2 = 3.8416.
    # centre = (0.85 + 3.8416 / 20) / (1 + 3.8416 / 10) = 1.04208 / 1.38416 = 0.752861
    # half = 1.96 / 1.38416 * sqrt(0.85 * 0.15 / 10 + 3.8416 / 400) = 0.211713
    assert result.low == pytest.approx(0.541148, abs=1e-6)
    assert result.high == pytest.approx(0.964574, abs=1e-6)


def test_win_rate_tolerance_and_bounds():
    result = win_rate([0.3 + 1e-12, 2.0], [0.3, 2.0])
    assert (result.ties, result.rate) == (2, 0.5)
    all_wins = win_rate([1.0] * 5, [0.0] * 5)
    assert all_wins.rate == 1.0 and all_wins.high == pytest.approx(1.0) and all_wins.low < 1.0
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_estimate_kl_is_zero_for_the_same_model_and_positive_otherwise(model, tokenizer):
    samples = sample(model, tokenizer, PROMPTS, max_new_tokens=8, seed=1)
    pad = tokenizer.pad_token_id
    kl, stderr = estimate_kl(model, model, samples, pad_id=pad, batch_size=2)
    assert abs(kl) < 1e-6 and abs(stderr) < 1e-6

    other = make_model(tokenizer, seed=1)
    kl, stderr = estimate_kl(model, other, samples, pad_id=pad, batch_size=2)
    assert kl > 0 and stderr > 0


def test_kl_terms_score_the_sampled_tokens_exactly(model, tokenizer):
    """Each term is log pi(y|x) - log pi_ref(y|x) of the very tokens sampled, eos included
    only where the model stopped by itself: checked against a plain float64 forward pass."""
    samples = sample(model, tokenizer, PROMPTS, max_new_tokens=6, seed=3, batch_size=3)
    other = make_model(tokenizer, seed=1)
    terms = kl_terms(model, other, samples, pad_id=tokenizer.pad_token_id, batch_size=3)
    eos = tokenizer.eos_token_id
    plain = [copy.deepcopy(m).double() for m in (model, other)]  # float64, one row at a time

    def answer_logp(m, s) -> float:
        with torch.no_grad():
            logp = m(torch.tensor([s.prompt_ids + s.answer_ids])).logits[0].log_softmax(-1)
        n = len(s.prompt_ids)  # position n - 1 + i predicts answer token i
        return sum(logp[n - 1 + i, t].item() for i, t in enumerate(s.answer_ids))

    for s, term in zip(samples, terms, strict=True):
        assert eos not in s.answer_ids[:-1]  # nothing after a stop
        assert len(s.answer_ids) == 6 or s.answer_ids[-1] == eos
        expected = answer_logp(plain[0], s) - answer_logp(plain[1], s)
        assert term == pytest.approx(expected, abs=1e-4)
    # the text round trip: generate gives the same answers as text, without eos
    texts = generate(model, tokenizer, PROMPTS, max_new_tokens=6, seed=3, batch_size=3)
    assert texts == [tokenizer.decode(s.answer_ids, skip_special_tokens=True) for s in samples]


def test_greedy_generation_ignores_batch_size_and_padding(model, tokenizer):
    batched_2 = generate(model, tokenizer, PROMPTS, temperature=0, batch_size=2, max_new_tokens=8)
    batched_8 = generate(model, tokenizer, PROMPTS, temperature=0, batch_size=8, max_new_tokens=8)
    alone = [
        generate(model, tokenizer, [prompt], temperature=0, max_new_tokens=8)[0]
        for prompt in PROMPTS
    ]
    assert batched_2 == batched_8 == alone
    assert any(batched_2)


def test_sampling_is_reproducible_for_a_seed(model, tokenizer):
    first = generate(model, tokenizer, PROMPTS, batch_size=2, seed=7, max_new_tokens=8)
    again = generate(model, tokenizer, PROMPTS, batch_size=2, seed=7, max_new_tokens=8)
    other = generate(model, tokenizer, PROMPTS, batch_size=2, seed=8, max_new_tokens=8)
    assert first == again
    assert first != other


def test_generate_leaves_tokenizer_and_global_rng_alone(model, tokenizer):
    side = tokenizer.padding_side
    state = torch.random.get_rng_state()
    generate(model, tokenizer, PROMPTS[:2], max_new_tokens=4)
    assert tokenizer.padding_side == side
    assert torch.equal(torch.random.get_rng_state(), state)


def test_load_causal_lm_names_a_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_causal_lm(str(tmp_path / "no-such-model"))


def test_evaluate_policy_end_to_end(tmp_path):
    policy_dir = save_tiny_model(tmp_path / "policy", seed=1)
    reference_dir = save_tiny_model(tmp_path / "reference", seed=0)
    result = evaluate_policy(
        str(policy_dir), str(reference_dir), PROMPTS, LengthJudge(), max_new_tokens=6, seed=3
    )
    expected = {
        "win_rate",
        "win_rate_ci",
        "wins",
        "ties",
        "losses",
        "n",
        "reward_policy",
        "reward_reference",
        "kl",
        "kl_stderr",
        "samples",
    }
    assert expected <= set(result)
    assert result["n"] == len(PROMPTS) == len(result["samples"])
    assert result["wins"] + result["ties"] + result["losses"] == result["n"]
    low, high = result["win_rate_ci"]
    assert 0.0 <= low <= result["win_rate"] <= high <= 1.0
    assert math.isfinite(result["kl"]) and math.isfinite(result["kl_stderr"])
    verdicts = [sample["verdict"] for sample in result["samples"]]
    assert verdicts.count("win") == result["wins"] and verdicts.count("tie") == result["ties"]
    assert result["reward_policy"] == pytest.approx(
        sum(s["policy_score"] for s in result["samples"]) / len(PROMPTS)
    )

    report = markdown_report(result, title="Policy vs reference", max_samples=2)
    assert report.startswith("# Policy vs reference")
    assert (
        "win rate" in report
        and report.count("| win |") + report.count("| tie |") + report.count("| loss |") == 2
    )


def test_evaluate_policy_against_itself_draws_independent_samples(tmp_path):
    model_dir = str(save_tiny_model(tmp_path / "same"))
    result = evaluate_policy(model_dir, model_dir, PROMPTS, LengthJudge(), max_new_tokens=6)
    # Independent draws: the same model does not simply tie with itself everywhere,
    # and its interval still covers 0.5.
    assert result["ties"] < result["n"]
    assert result["win_rate_ci"][0] <= 0.5 <= result["win_rate_ci"][1]
    assert abs(result["kl"]) < 1e-6


class CountingJudge(LengthJudge):
    """LengthJudge that counts the answers it scores."""

    def __init__(self):
        self.scored = 0

    def score(self, prompts, answers):
        self.scored += len(answers)
        return super().score(prompts, answers)


def test_a_killed_evaluation_resumes_from_the_chunks_already_judged(tmp_path):
    policy_dir = str(save_tiny_model(tmp_path / "policy", seed=1))
    reference_dir = str(save_tiny_model(tmp_path / "reference", seed=0))
    prompts = PROMPTS * 2  # 10 prompts: 5 chunks of 2
    settings = dict(
        max_new_tokens=6,
        seed=3,
        batch_size=2,
        temperatures=[1.0, 0.7],
        chosen=["a fine movie"] * 10,
    )
    whole = evaluate_policy(policy_dir, reference_dir, prompts, LengthJudge(), **settings)

    path = tmp_path / "judged.jsonl"
    evaluate_policy(
        policy_dir, reference_dir, prompts, LengthJudge(), **settings, progress=JudgedLog(path)
    )
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 10  # 5 chunks at each of 2 temperatures
    # As if killed while writing the fourth line: three whole lines and a cut one.
    path.write_text("".join(lines[:3]) + lines[3][:25])

    log = JudgedLog(path)
    assert log.resumed_prompts == 6
    judge = CountingJudge()
    lines = []
    resumed = evaluate_policy(
        policy_dir, reference_dir, prompts, judge, **settings, progress=log, log=lines.append
    )
    # Progress per temperature: the judged prompts count as done, not in the rate.
    assert lines[0] == "evaluation at temperature 1: 0% of 10 prompts (6 done before)"
    assert lines[1].startswith("evaluation at temperature 1: 8/10 prompts (80%), ")
    assert "ETA" in lines[1] and lines[-1].startswith("evaluation at temperature 0.7: 10/10")
    # Only the 7 unfinished chunks were judged: 2 prompts x (policy + reference answer)
    # each, and the 2 of them at the main temperature also x (policy + chosen answer).
    assert judge.scored == 7 * 2 * 2 + 2 * 2 * 2
    assert resumed == whole
    assert len(path.read_text().splitlines()) == 10 and path.read_text().endswith("\n")
