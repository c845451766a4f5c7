"""The reference stage's job under the real `deepspeed` launcher: only the pairs DPO reads,
sharded over processes, resumable from its chunks, scoring QLoRA's 4-bit base, and launched
from an installed (not editable) dpoflow too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dpoflow.config import DistributedConfig, DPOConfig
from dpoflow.models.reference import pair_ids, read_reference_logps
from dpoflow.models.reference_worker import EXIT_AFTER_CHUNKS, OUTPUT
from dpoflow.models.trainer import batch_indices, examples_read, read_pairs, split_heldout
from dpoflow.tasks.launcher import TrainingFailed, run_training
from dpoflow.tasks.reference import PAIRS_READ, WORKER
from tests.conftest import PROJECT_ROOT, worker_fixture

N_PAIRS = 64
# 3 steps of 8 pairs read 24 of the 64 pairs: 3 chunks of 8.
DPO = dict(max_steps=3, batch_size=8, max_length=64, max_prompt_length=16)
CHUNK = 8


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> dict[str, str]:
    from dpoflow.tasks.sources import ensure_embedded_data, ensure_embedded_model

    root = tmp_path_factory.mktemp("embedded")
    model = ensure_embedded_model(root)
    lines = (ensure_embedded_data(root) / "train.jsonl").read_text().splitlines()[:N_PAIRS]
    data = root / "pairs.jsonl"
    data.write_text("\n".join(lines) + "\n")
    return {"model": str(model), "data": str(data)}


def job(embedded: dict, out: Path, processes: int = 1) -> dict:
    dpo = {k: v for k, v in DPOConfig(**DPO).model_dump().items() if k in PAIRS_READ}
    return {
        "kind": "reference",
        "train": dpo,
        "distributed": DistributedConfig(num_processes=processes).model_dump(),
        "model_path": embedded["model"],
        "data_path": embedded["data"],
        "output_dir": str(out),
        "chunks_dir": str(out / "chunks"),
        "chunk_pairs": CHUNK,
        "metrics_path": str(out / "metrics.jsonl"),
    }


def run_job(spec: dict, lines: list[str] | None = None) -> tuple[dict, dict, float]:
    """(result.json, stored log-probs, seconds) of one launcher run."""
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    log = lines.append if lines is not None else (lambda line: None)
    result = run_training(spec, out, log=log, on_metrics=lambda rows: None, module=WORKER)
    return result, read_reference_logps(out / OUTPUT), time.monotonic() - start


@worker_fixture
def one_process(embedded, tmp_path_factory):
    lines: list[str] = []
    result, stored, seconds = run_job(job(embedded, tmp_path_factory.mktemp("one")), lines)
    return result, stored, seconds, lines


def naive_pairs_read(n: int, cfg: dict) -> set[int]:
    """The training loop's reads spelled out step by step: the held-out examples and each
    step's global batch, mapped back to file rows."""
    rows, heldout = split_heldout(list(range(n)), cfg)
    read = set(heldout)
    for step in range(cfg["max_steps"]):
        read |= {rows[i] for i in batch_indices(len(rows), step, cfg["batch_size"], cfg["seed"])}
    return read


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_steps=3, batch_size=8),  # part of one epoch
        dict(max_steps=7, batch_size=8, eval_every=2, eval_examples=5),  # + held out
        dict(max_steps=9, batch_size=8, seed=3),  # more than one epoch: all
        dict(max_steps=1, batch_size=4, seed=5),
    ],
)
def test_examples_read_are_the_training_loops_batches(settings):
    cfg = DPOConfig(**settings).model_dump()
    assert examples_read(N_PAIRS, cfg) == sorted(naive_pairs_read(N_PAIRS, cfg))


@pytest.mark.slow
def test_only_the_pairs_dpo_reads_are_scored_and_they_match_in_process_scoring(
    embedded, one_process
):
    from dpoflow.models.reference import compute_reference_logps

    result, stored, seconds, lines = one_process
    cfg = DPOConfig(**DPO).model_dump()
    ids = pair_ids(read_pairs(embedded["data"]))
    expected = [ids[i] for i in sorted(naive_pairs_read(N_PAIRS, cfg))]
    assert stored["ids"] == expected and result["n_pairs"] == 24 < N_PAIRS
    assert result["chunks"] == 3 and result["reused_chunks"] == 0
    everything = compute_reference_logps(embedded["model"], embedded["data"], **DPO_LIMITS)
    at = {example_id: i for i, example_id in enumerate(everything["ids"])}
    for side in ("chosen", "rejected"):
        full = everything[side][[at[i] for i in stored["ids"]]]
        # Other batches (other padding widths) reassociate float32 sums of ~100 nats.
        assert torch.allclose(stored[side], full, atol=1e-4, rtol=1e-6)
    # Progress: a first line, lines with a rate and an ETA, and a last one at 100%.
    progress = [line for line in lines if "[reference] log-probs" in line]
    assert progress[0].endswith("0% of 24 pairs") and "(100%)" in progress[-1]
    assert any("pairs/s, ETA" in line for line in progress)


DPO_LIMITS = dict(max_length=DPO["max_length"], max_prompt_length=DPO["max_prompt_length"])


@pytest.mark.slow
def test_two_processes_store_the_log_probs_of_one(embedded, one_process, tmp_path):
    _, single, single_seconds, _ = one_process
    result, double, seconds = run_job(job(embedded, tmp_path, processes=2))
    assert result["world_size"] == 2 and double["ids"] == single["ids"]
    for side in ("chosen", "rejected"):
        assert torch.allclose(double[side], single[side], atol=1e-6, rtol=0)
    print(f"reference job: 1 process {single_seconds:.1f} s, 2 processes {seconds:.1f} s")


@pytest.mark.slow
def test_a_killed_job_resumes_from_its_finished_chunks(
    embedded, one_process, tmp_path, monkeypatch
):
    spec = job(embedded, tmp_path)
    monkeypatch.setenv(EXIT_AFTER_CHUNKS, "2")
    with pytest.raises(TrainingFailed):
        run_job(spec)
    finished = sorted(p.name for p in (tmp_path / "chunks").glob("*.safetensors"))
    assert len(finished) == 2 and not (tmp_path / OUTPUT).exists()
    # A damaged chunk is not reused: it is scored again.
    damaged = tmp_path / "chunks" / finished[1]
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    monkeypatch.delenv(EXIT_AFTER_CHUNKS)
    result, resumed, _ = run_job(spec)
    assert result["reused_chunks"] == 1
    _, uninterrupted, _, _ = one_process
    assert resumed["ids"] == uninterrupted["ids"]
    for side in ("chosen", "rejected"):
        assert torch.equal(resumed[side], uninterrupted[side])


def test_a_qlora_runs_reference_is_its_nf4_base(embedded, one_process, tmp_path):
    """With `model.load_in_4bit` the policy starts from the NF4-quantized base, so the stage
    scores that base (the stage's cache key reads the setting), not the unquantized weights."""
    from dpoflow.config import load_config
    from dpoflow.models.reference import compute_reference_logps
    from dpoflow.tasks.reference import STAGE

    _, unquantized, _, _ = one_process
    _, stored, _ = run_job(dict(job(embedded, tmp_path), load_in_4bit=True))
    everything = compute_reference_logps(
        embedded["model"], embedded["data"], load_in_4bit=True, **DPO_LIMITS
    )
    at = {example_id: i for i, example_id in enumerate(everything["ids"])}
    assert stored["ids"] == unquantized["ids"]
    for side in ("chosen", "rejected"):
        in_process = everything[side][[at[i] for i in stored["ids"]]]
        # bitsandbytes computes in bf16: other batches round a little differently.
        assert torch.allclose(stored[side], in_process, atol=0.05, rtol=0)
        assert (stored[side] - unquantized[side]).abs().max() > 0.1  # 4 bits are not 32
    cfg = load_config(overrides=["model.load_in_4bit=true", "model.lora={r: 4}"])
    assert STAGE.reads(cfg, None)["load_in_4bit"] is True


def test_an_installed_dpoflow_runs_its_jobs(embedded, tmp_path):
    """Installed as users install it (not editable), the package's own folder is where its
    jobs run, and its `deepspeed/` (the ZeRO configs) must not shadow the real deepspeed."""
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index"]
    pip += ["--no-build-isolation", "--target", str(site), str(PROJECT_ROOT)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    spec = job(embedded, tmp_path / "out")
    (tmp_path / "job.json").write_text(json.dumps(spec))
    code = (
        "import json, sys; from pathlib import Path; from dpoflow.tasks import launcher; "
        "print(launcher.PROJECT_ROOT); spec = json.load(open(sys.argv[1])); "
        "Path(spec['output_dir']).mkdir(); launcher.run_training(spec, "
        "Path(spec['output_dir']), log=print, on_metrics=print, module=sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "job.json"), WORKER],
        cwd=tmp_path,
        env=os.environ | {"PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0] == str(site / "dpoflow")  # the installed copy ran
    assert len(read_reference_logps(tmp_path / "out" / OUTPUT)["ids"]) == 24
