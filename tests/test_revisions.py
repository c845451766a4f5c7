"""`model.revision` and `data.revision`: hub sources are fingerprinted by their resolved commit
and every hub load gets the revision. No test here reaches the network: the hub is faked."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi

from dpoflow.tasks.sources import fingerprint, resolve_sources


@pytest.fixture
def hub(monkeypatch) -> SimpleNamespace:
    """A fake hub: `repo_info` answers `hub.sha` (or raises `hub.error`) and records calls."""
    state = SimpleNamespace(sha="a" * 40, error=None, calls=[])

    def repo_info(self, repo_id, *, revision=None, repo_type=None, timeout=None, **_):
        state.calls.append((repo_id, revision, repo_type))
        if state.error:
            raise state.error
        return SimpleNamespace(sha=state.sha)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return state


def test_a_hub_model_is_fingerprinted_by_the_commit_its_revision_resolves_to(hub):
    first = fingerprint("org/model", "v1")
    assert first == f"hub:org/model@{'a' * 40}"
    assert hub.calls == [("org/model", "v1", "model")]
    hub.sha = "b" * 40  # the repo was updated on the hub under the same revision
    assert fingerprint("org/model", "v1") == f"hub:org/model@{'b' * 40}" != first


def test_hub_data_is_asked_for_as_a_dataset_repo(hub, tmp_path):
    from dpoflow.config import PipelineConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    cfg = PipelineConfig.model_validate(
        {
            "model": {"base": "org/model", "revision": "v1"},
            "data": {"train": "org/pairs", "revision": "v2", "eval_prompts": str(prompts)},
        }
    )
    sources = resolve_sources(cfg, tmp_path)
    assert hub.calls == [("org/model", "v1", "model"), ("org/pairs", "v2", "dataset")]
    assert sources["base_model"]["sha256"] == f"hub:org/model@{'a' * 40}"
    assert sources["train_data"]["sha256"] == f"hub:org/pairs@{'a' * 40}"


def test_offline_the_fingerprint_is_the_revision_name_and_says_why(hub, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.INFO, logger="dpoflow"):
        assert fingerprint("org/model", "v1") == "hub:org/model@v1"
        assert fingerprint("org/model") == "hub:org/model@main"
    assert hub.calls == []  # not asked at all
    assert "HF_HUB_OFFLINE" in caplog.text


def test_when_the_hub_fails_the_fingerprint_is_the_revision_name_and_says_why(hub, caplog):
    hub.error = ConnectionError("no route to host")
    with caplog.at_level(logging.WARNING, logger="dpoflow"):
        assert fingerprint("org/model", "v1") == "hub:org/model@v1"
    assert "ConnectionError: no route to host" in caplog.text


# ---------------------------------------------------------------- the revision reaches the loads


class Loaded(Exception):
    """Raised by the spy once it has seen a load: the test needs no real model."""


@pytest.fixture
def loads(monkeypatch) -> list[tuple[str, str, str | None]]:
    """Spy on every `from_pretrained` the project calls: (class, name, revision), then stop."""
    import transformers

    seen: list[tuple[str, str, str | None]] = []
    for cls in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):

        def spy(name, *args, _cls=cls, **kwargs):
            seen.append((_cls, str(name), kwargs.get("revision")))
            if _cls != "AutoTokenizer":  # the tokenizer comes first: let the model load follow
                raise Loaded
            return SimpleNamespace(pad_token_id=0, eos_token_id=0)

        monkeypatch.setattr(getattr(transformers, cls), "from_pretrained", spy)
    return seen


def test_generation_loads_a_hub_model_at_its_revision(loads):
    from dpoflow.models.generation import load_causal_lm

    with pytest.raises(Loaded):
        load_causal_lm("org/model", revision="v1")
    assert loads == [
        ("AutoTokenizer", "org/model", "v1"),
        ("AutoModelForCausalLM", "org/model", "v1"),
    ]


def test_reference_logps_load_a_hub_model_at_its_revision(loads, tmp_path):
    from dpoflow.models.reference import compute_reference_logps

    with pytest.raises(Loaded):
        compute_reference_logps(
            "org/model", tmp_path / "pairs.jsonl", max_length=8, max_prompt_length=4, revision="v1"
        )
    assert [revision for _, _, revision in loads] == ["v1", "v1"]


def test_the_reward_model_judge_loads_at_its_revision(loads):
    from dpoflow.models.judges import RewardModelJudge

    with pytest.raises(Loaded):
        RewardModelJudge("org/reward", revision="v1")
    assert loads == [
        ("AutoTokenizer", "org/reward", "v1"),
        ("AutoModelForSequenceClassification", "org/reward", "v1"),
    ]


def test_the_training_job_loads_its_model_at_the_jobs_revision(loads, monkeypatch, tmp_path):
    """The trainer reads `model_revision` from its job; DeepSpeed and torch.distributed are
    faked (two processes, so the one-process shm skip does not import DeepSpeed either)."""
    import torch.distributed as dist

    from dpoflow.models import trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(
        trainer, "import_deepspeed", lambda: SimpleNamespace(init_distributed=lambda **_: None)
    )
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 1)
    job = {
        "kind": "sft",
        "train": {"seed": 0},
        "model_path": "org/model",
        "model_revision": "v1",
        "output_dir": str(tmp_path / "model"),
        "checkpoint_dir": str(tmp_path / "checkpoints"),
        "metrics_path": str(tmp_path / "metrics.jsonl"),
    }
    with pytest.raises(Loaded):
        trainer.train(job)
    assert loads == [
        ("AutoTokenizer", "org/model", "v1"),
        ("AutoModelForCausalLM", "org/model", "v1"),
    ]
