"""Reward-model judge, pairwise judges in the evaluation, extra temperatures, chosen answers,
and the judge settings in the config."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from dpoflow.config import load_config
from dpoflow.errors import ConfigError, ModelError
from dpoflow.flows.run_view import samples_table
from dpoflow.models.evaluation import evaluate_policy
from dpoflow.models.evaluation_report import markdown_report
from dpoflow.models.judge_protocol import Judge
from dpoflow.models.judges import RewardModelJudge, make_judge
from dpoflow.tasks.evaluate import eval_metrics
from tests.test_evaluation import PROMPTS, make_tokenizer, save_tiny_model


def save_reward_model(directory, num_labels: int = 1):
    tokenizer = make_tokenizer()
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_judge_scores_each_answer_in_batches(tmp_path):
    path = str(save_reward_model(tmp_path / "rm"))
    judge = make_judge("reward_model", {"reward_model": path, "batch_size": 2})
    assert isinstance(judge, Judge) and judge.name == "reward_model"
    answers = [" great movie", " terrible and boring", "", " a fine day", " i loved it"]
    scores = judge.score(PROMPTS, answers)
    assert len(scores) == len(PROMPTS) and all(math.isfinite(s) for s in scores)
    assert len(set(scores)) > 1
    # Batching and padding do not change a text's score.
    one_batch = RewardModelJudge(path, batch_size=64).score(PROMPTS, answers)
    assert scores == pytest.approx(one_batch, abs=1e-5)
    assert judge.score(PROMPTS[:1], answers[:1]) == pytest.approx(scores[:1], abs=1e-5)


def test_reward_model_judge_refuses_missing_and_multi_label_models(tmp_path):
    with pytest.raises(ModelError, match="eval.reward_model"):
        RewardModelJudge(str(tmp_path / "nowhere"))
    with pytest.raises(ModelError, match="num_labels=1"):
        RewardModelJudge(str(save_reward_model(tmp_path / "two", num_labels=2)))
    with pytest.raises(ConfigError, match="eval.reward_model"):
        make_judge("reward_model", {})


class FirstIsLongerJudge:
    """A pairwise judge: the longer answer wins, equal lengths tie, "???" is unparseable."""

    name = "longer"

    def compare(self, prompts, answers_a, answers_b):
        def one(a, b):
            if "???" in a + b:
                return "unparseable"
            return "win" if len(a) > len(b) else "loss" if len(a) < len(b) else "tie"

        return [one(a, b) for a, b in zip(answers_a, answers_b, strict=True)]


def test_pairwise_judge_feeds_the_win_rate_with_temperatures_and_chosen(tmp_path):
    policy = str(save_tiny_model(tmp_path / "policy", seed=1))
    reference = str(save_tiny_model(tmp_path / "reference", seed=2))
    chosen = ["???", None, "x", "a much longer chosen answer than any sample", None]
    result = evaluate_policy(
        policy,
        reference,
        PROMPTS,
        FirstIsLongerJudge(),
        max_new_tokens=6,
        temperature=1.0,
        temperatures=[0.0, 1.0],
        chosen=chosen,
    )
    verdicts = [s["verdict"] for s in result["samples"]]
    assert result["wins"] == verdicts.count("win") and result["n"] == len(PROMPTS)
    assert math.isnan(result["reward_policy"]) and math.isnan(result["samples"][0]["policy_score"])
    # The main figures are those at eval.temperature; 0 is evaluated as well.
    assert result["by_temperature"]["1"]["win_rate"] == result["win_rate"]
    assert set(result["by_temperature"]) == {"0", "1"}
    # Against the dataset's answers: 3 prompts have one, one reply is unparseable.
    assert result["vs_chosen"]["n"] == 2 and result["vs_chosen"]["unparseable"] == 1
    assert result["vs_chosen"]["win_rate"] <= 0.5  # never longer than the long one

    metrics = eval_metrics(result, "llm")
    for name in ("eval/win_rate", "eval/win_rate_t0", "eval/kl_t0", "eval/win_rate_ci_low_t1"):
        assert name in metrics
    assert metrics["eval/unparseable_vs_chosen"] == 1.0
    # A chart is titled by the name's last segment: each must say which figure it is.
    leaves = [name.rsplit("/", 1)[-1] for name in metrics]
    assert len(leaves) == len(set(leaves))
    # Only a judge that can fail to give a verdict charts the unparseable count.
    assert not any("unparseable" in name for name in eval_metrics(result, "vader"))
    assert "temperature 0" in markdown_report(result, title="t")
    rows = samples_table(result["samples"])  # the Prefect table: short columns first
    assert list(rows[0])[:3] == ["verdict", "policy score", "reference score"]
    assert list(rows[0])[-1] == "reference answer"


def test_eval_config_names_the_judge_and_its_options():
    with pytest.raises(ConfigError, match=r"eval\.judge.*one of llm, reward_model, vader"):
        load_config(overrides=["eval.judge=gpt4"])
    with pytest.raises(ConfigError, match="eval.reward_model"):
        load_config(overrides=["eval.judge=reward_model"])
    with pytest.raises(ConfigError, match="eval.llm.base_url"):
        load_config(overrides=["eval.judge=llm"])
    with pytest.raises(ConfigError, match="eval.llm.api_key"):
        load_config(overrides=["eval.llm.api_key=sk-123"])  # only the variable's name is kept
    cfg = load_config(
        overrides=[
            "eval.judge=llm",
            "eval.llm.base_url=http://127.0.0.1:8000/v1",
            "eval.llm.model=m",
            "eval.llm.api_key_env=MY_KEY",
            "eval.temperatures=[0.7,1.0]",
        ]
    )
    assert cfg.eval.llm.api_key_env == "MY_KEY" and cfg.eval.temperatures == [0.7, 1.0]
