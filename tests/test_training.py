"""The training loop under the real `deepspeed` launcher: 1 vs 2 processes, ZeRO, resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dpoflow.config import DistributedConfig, DPOConfig, SFTConfig
from dpoflow.tasks.launcher import TrainingTimedOut, child_env, launcher_command, run_training
from tests.conftest import worker_fixture
from tests.servers import processes_mentioning

pytestmark = pytest.mark.slow
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """The embedded model and data, and reference log-probs of the first 256 pairs."""
    from dpoflow.models.reference import compute_reference_logps
    from dpoflow.tasks.sources import ensure_embedded_data, ensure_embedded_model

    root = tmp_path_factory.mktemp("embedded")
    model = ensure_embedded_model(root)
    lines = (ensure_embedded_data(root) / "train.jsonl").read_text().splitlines()[:256]
    data = root / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    ref = compute_reference_logps(str(model), data, max_length=64, max_prompt_length=16)
    torch.save(ref, root / "ref.pt")
    return {"model": str(model), "data": str(data), "ref": str(root / "ref.pt")}


def make_job(
    embedded, out: Path, kind: str = "dpo", processes: int = 1, zero: int = 0, **train
) -> dict:
    small = dict(
        max_steps=8,
        batch_size=8,
        max_length=64,
        max_prompt_length=16,
        warmup_steps=2,
        checkpoint_every=4,
    )
    section = (DPOConfig if kind == "dpo" else SFTConfig)(**(small | train))
    return {
        "kind": kind,
        "train": section.model_dump(),
        "distributed": DistributedConfig(num_processes=processes, zero_stage=zero).model_dump(),
        "model_path": embedded["model"],
        "data_path": embedded["data"],
        "reference_logps_path": embedded["ref"] if kind == "dpo" else None,
        "output_dir": str(out / "model"),
        "checkpoint_dir": str(out / "checkpoints"),
        "metrics_path": str(out / "metrics.jsonl"),
    }


def train(job: dict, out: Path, log=lambda line: None) -> tuple[dict, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    result = run_training(job, out, log=log, on_metrics=rows.extend)
    return result, rows


def losses(rows: list[dict]) -> list[float]:
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


@worker_fixture
def one_process(embedded, tmp_path_factory):
    """A one-process DPO job: (result, metric rows, its log lines)."""
    out, lines = tmp_path_factory.mktemp("one"), []
    return *train(make_job(embedded, out), out, log=lines.append), lines


def test_sft_trains_and_saves_a_loadable_model(embedded, tmp_path):
    from transformers import AutoModelForCausalLM

    result, rows = train(make_job(embedded, tmp_path, kind="sft", learning_rate=3e-3), tmp_path)
    assert result["resumed_from_step"] == 0 and result["steps"] == 8
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert losses(rows)[-1] < losses(rows)[0]  # it learns
    assert {"learning_rate", "grad_norm", "tokens_per_s", "sequences_per_s"} <= set(rows[0])
    AutoModelForCausalLM.from_pretrained(tmp_path / "model")


def test_dpo_logs_every_metric_and_learns(one_process):
    result, rows, _ = one_process
    expected = {
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "logits/rejected",
        "grad_norm",
        "learning_rate",
        "pairs_per_s",
        "tokens_per_s",
    }
    assert expected <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert losses(rows)[-1] < losses(rows)[0]
    assert result["final_metrics"]["rewards/margins"] > 0


def test_the_log_holds_the_jobs_progress_not_launcher_bookkeeping_or_bars(one_process):
    *_, lines = one_process
    assert any("[dpo] training:" in line and "ETA" in line for line in lines)
    assert not [line for line in lines if "[launch.py:" in line or "it/s]" in line]


# Two processes see the same global batches, so the curves agree up to float
# reassociation in the gradient all-reduce, amplified a little by Adam over 8 steps.
LOSS_TOLERANCE = 1e-4


@pytest.mark.parametrize("zero", [2, 3])
def test_two_processes_follow_the_one_process_curve(embedded, one_process, tmp_path, zero):
    result, rows = train(make_job(embedded, tmp_path, processes=2, zero=zero), tmp_path)
    assert result["world_size"] == 2
    diff = max(abs(a - b) for a, b in zip(losses(rows), losses(one_process[1]), strict=True))
    print(f"ZeRO-{zero}, 2 processes: max |loss - 1-process loss| = {diff:.2e}")
    assert diff < LOSS_TOLERANCE
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_sigkill_then_resume_from_the_newest_checkpoint(embedded, one_process, tmp_path):
    job = make_job(embedded, tmp_path, checkpoint_every=3)
    tmp_path.mkdir(exist_ok=True)
    job_path = tmp_path / "job.json"
    job_path.write_text(json.dumps(job))
    proc = subprocess.Popen(
        launcher_command(job_path, job["distributed"]),
        cwd=PROJECT_ROOT,
        env=child_env(job["distributed"]),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = tmp_path / "checkpoints" / "latest"
    deadline = time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() == "step6"):
        assert proc.poll() is None, "training ended before its second checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "model").exists()

    result, rows = train(job, tmp_path)
    assert result["resumed_from_step"] == 6
    resumed_final = losses(rows)[-1]
    uninterrupted_final = losses(one_process[1])[-1]
    print(f"resumed from step 6: final loss {resumed_final:.6f} vs {uninterrupted_final:.6f}")
    assert abs(resumed_final - uninterrupted_final) < LOSS_TOLERANCE


def test_timeout_ends_the_whole_process_group(embedded, tmp_path):
    job = make_job(embedded, tmp_path, max_steps=10_000)
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(TrainingTimedOut):  # a user error: final, never retried
        run_training(
            job, tmp_path, log=lambda line: None, on_metrics=lambda rows: None, timeout_seconds=8
        )
    time.sleep(0.5)
    assert processes_mentioning(str(tmp_path / "job.json")) == []  # no orphan worker


@pytest.mark.parametrize("zero", [0, 1])
def test_a_bf16_run_starts_at_its_reference_when_the_reference_is_bf16(embedded, tmp_path, zero):
    """The reference stage runs in the training's precision: a bf16 policy's first-step
    log-ratios against a bf16 reference are zero (loss log 2), not the bf16-vs-fp32 gap."""
    from dpoflow.models.reference import compute_reference_logps

    ref = compute_reference_logps(
        embedded["model"],
        embedded["data"],
        max_length=64,
        max_prompt_length=16,
        precision="bf16",
    )
    fp32 = torch.load(embedded["ref"])
    assert ref["chosen"].dtype == torch.float32 and ref["ids"] == fp32["ids"]
    assert 0 < (ref["chosen"] - fp32["chosen"]).abs().max() < 2.0  # bf16 rounding, not noise
    torch.save(ref, tmp_path / "ref_bf16.pt")

    def first_step(reference: str, out: Path) -> tuple[dict, dict]:
        job = make_job(embedded, out, zero=zero, max_steps=1, learning_rate=1e-6)
        job["distributed"]["precision"] = "bf16"
        job["reference_logps_path"] = reference
        result, rows = train(job, out)
        return result, rows[0]

    result, matched = first_step(str(tmp_path / "ref_bf16.pt"), tmp_path / "bf16")
    # DeepSpeed's bf16 wrappers: fp32 master weights beside the bf16 ones
    assert result["optimizer"] == ("DeepSpeedZeroOptimizer" if zero else "FP16_UnfusedOptimizer")
    _, mixed = first_step(embedded["ref"], tmp_path / "mixed")
    gaps = {k: (matched[k], mixed[k]) for k in ("rewards/chosen", "rewards/rejected", "loss")}
    print(f"\nbf16 reference vs fp32 reference, first step (matched, mixed): {gaps}")
    # bf16 rounds a row's log-prob a little differently in a differently shaped batch (the
    # reference scores length-sorted batches of 64, the step its own batch, its LM head in
    # other chunks): seen, one chosen row off by 2.6e-4 nats (reward 2.6e-5), the rest exact;
    # an fp32 reference is off on every row.
    matched_gap = abs(matched["rewards/chosen"]) + abs(matched["rewards/rejected"])
    mixed_gap = abs(mixed["rewards/chosen"]) + abs(mixed["rewards/rejected"])
    assert matched_gap < 5e-5 and mixed_gap > 5 * matched_gap
    assert matched["loss"] == pytest.approx(math.log(2), abs=5e-5)
    assert abs(mixed["rewards/chosen"]) > 1e-4  # a bf16 policy against an fp32 reference


@pytest.mark.parametrize("tied", [True, False])
def test_embedding_gradient_added_in_place_is_bit_identical(tied, monkeypatch):
    """add_embedding_grads_in_place (fp32, one process) changes where the embedding's gradient
    is summed, not its value: gradients and weights after a few AdamW steps, one of them with
    a second micro-batch accumulated, equal plain autograd's bit for bit."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpoflow.models import cpu_memory
    from dpoflow.models.cpu_memory import add_embedding_grads_in_place
    from dpoflow.models.logprobs import collate, sequence_logps

    # Count the micro-batches whose embedding gradient took the in-place path.
    into_grad = []
    plain_apply = cpu_memory._EmbeddingIntoGrad.apply

    def counted_apply(*args):
        into_grad.append(args[0].shape)
        return plain_apply(*args)

    monkeypatch.setattr(cpu_memory._EmbeddingIntoGrad, "apply", counted_apply)

    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        tie_word_embeddings=tied,
    )
    generator = torch.Generator().manual_seed(0)

    def batch() -> dict:
        rows = []
        for _ in range(6):  # repeated tokens and padding (id 0) in every batch
            n_prompt, n_answer = torch.randint(2, 6, (2,), generator=generator).tolist()
            ids = torch.randint(1, 40, (n_prompt + n_answer,), generator=generator).tolist()
            rows.append((ids[:n_prompt], ids[n_prompt:]))
        return collate(rows, pad_token_id=0)

    batches = [batch() for _ in range(4)]

    def run(in_place: bool) -> list[dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        if in_place:
            add_embedding_grads_in_place(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        seen = []
        for micro in [[0], [1], [2, 3]]:  # the last step accumulates two micro-batches
            for i in micro:
                logps = sequence_logps(model, batches[i])["logps"]
                (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
            seen.append({n: p.grad.clone() for n, p in model.named_parameters()})
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return seen

    plain = run(False)
    assert into_grad == []
    in_place = run(True)
    # Batches 0, 1 and 2 start with no gradient: in place; batch 3 accumulates: ordinary path.
    assert into_grad == [batches[i]["input_ids"].shape for i in (0, 1, 2)]
    for a, b in zip(plain, in_place, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    assert plain[0]["model.embed_tokens.weight"].abs().sum() > 0


def test_a_one_process_job_does_not_build_the_shared_memory_op(one_process):
    """DeepSpeed builds (minutes the first time) and loads its shared-memory all-reduce op on
    every CPU start; one process has no peer to share memory with, so it is skipped."""
    _, _, lines = one_process
    assert any("1 process(es)" in line for line in lines)  # the trainer's log did arrive
    assert not [line for line in lines if "shm_comm" in line or "ShareMemComm" in line]


def test_a_changed_checkpoint_is_refused_and_nothing_is_trained_from_it(embedded, tmp_path):
    import shutil

    from dpoflow.errors import CheckpointError, UserError
    from dpoflow.models.trainer import CheckpointRefused, verify_checkpoint

    job = make_job(embedded, tmp_path, max_steps=3, checkpoint_every=2)
    train(job, tmp_path)
    checkpoint = tmp_path / "checkpoints" / "step2"
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step2"
    recorded = json.loads((checkpoint / "sha256.json").read_text())
    files = sorted(p for p in checkpoint.rglob("*.pt"))
    assert files and {p.relative_to(checkpoint).as_posix() for p in files} <= set(recorded)

    # The model is gone (as after a kill), so a run would resume from step 2: flip one byte.
    shutil.rmtree(tmp_path / "model")
    metrics = (tmp_path / "metrics.jsonl").read_text()
    victim = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))

    with pytest.raises(CheckpointError) as refused:
        run_training(job, tmp_path, log=lambda line: None, on_metrics=lambda rows: None)
    assert isinstance(refused.value, UserError)  # one sentence, not retried
    assert str(refused.value) == (
        f"checkpoint {checkpoint} does not match the sha256 recorded when it was written (a "
        f"file was changed, added or removed), so it was not resumed: delete {tmp_path} to "
        "start this stage over."
    )
    assert not (tmp_path / "model").exists()  # nothing was trained from it
    assert (tmp_path / "metrics.jsonl").read_text() == metrics

    # A checkpoint without its hashes cannot be verified, so it is refused too.
    (checkpoint / "sha256.json").unlink()
    with pytest.raises(CheckpointRefused, match=r"has no sha256\.json .* start this stage over"):
        verify_checkpoint(tmp_path / "checkpoints", "step2", rank=0, world=1, dist=None)
