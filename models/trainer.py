"""The training loop for SFT and DPO, one file, run under the `deepspeed` launcher.

    deepspeed --num_gpus N --module dpoflow.models.trainer --job job.json

(by hand; `tasks/launcher.py` starts DeepSpeed's node launcher directly on one machine,
one process fewer: `models/node_launcher.py`).

The job file (written by `tasks/launcher.py`) says what to train: `kind` is
"sft" (NLL of answer tokens) or "dpo" (the preference loss against a frozen
reference). Everything else is the same loop, so a fix lands in one place:

    for step in range(start, max_steps):
        for each micro-batch of this rank:
            loss = objective(batch); engine.backward(loss); engine.step()
        rank 0: append the step's metrics to metrics.jsonl
        every checkpoint_every steps: engine.save_checkpoint(...)   (resume point)

The global batch of a step is the same whatever the number of processes: a
seeded permutation of the data is cut into global batches, each global batch
into `grad_accum` chunks, and each chunk across ranks. So a 2-process run
follows the 1-process loss curve.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from dpoflow.models import lora
from dpoflow.models.cpu_memory import add_embedding_grads_in_place, heap_trimmer
from dpoflow.models.drift import SAMPLES_FILE, DriftProbe, sample_answers
from dpoflow.models.logprobs import (
    collate,
    sequence_logps,
    split_pair_logps,
    tokenize_example,
)
from dpoflow.models.losses import preference_loss
from dpoflow.models.node_launcher import import_deepspeed
from dpoflow.models.packing import pair_inputs
from dpoflow.models.progress import Progress
from dpoflow.models.reference import pair_ids, read_reference_logps
from dpoflow.process_gc import freeze_objects_at_exit

# infra/deepspeed/ is installed as the data package `dpoflow.deepspeed` (pyproject.toml).
INFRA = Path(str(resources.files("dpoflow.deepspeed")))
# Beside each checkpoint tag: {file: sha256} of its files, written once the checkpoint is whole.
CHECKPOINT_HASHES = "sha256.json"
# Beside the job file: why the job refused to run, read by tasks/launcher.py (same name there).
JOB_ERROR = "error.json"


class CheckpointRefused(Exception):
    """The checkpoint to resume from fails its sha256 check; the message is one sentence."""


# ---------------------------------------------------------------- data


def read_pairs(path: str) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def sft_examples(pairs: list[dict], tokenizer, cfg: dict) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) for each answer the reference learns."""
    keys = ["chosen", "rejected"] if cfg["answers"] == "both" else ["chosen"]
    limits = dict(max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    return [tokenize_example(tokenizer, p["prompt"], p[k], **limits) for p in pairs for k in keys]


def dpo_examples(pairs: list[dict], tokenizer, cfg: dict) -> list[tuple]:
    """(prompt_ids, chosen_ids, rejected_ids, example index) for each pair."""
    limits = dict(max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    examples = []
    for i, p in enumerate(pairs):
        prompt_ids, chosen_ids = tokenize_example(tokenizer, p["prompt"], p["chosen"], **limits)
        _, rejected_ids = tokenize_example(tokenizer, p["prompt"], p["rejected"], **limits)
        examples.append((prompt_ids, chosen_ids, rejected_ids, i))
    return examples


def batch_indices(n: int, step: int, batch_size: int, seed: int) -> list[int]:
    """The global batch of `step`: consecutive slices of seeded per-epoch permutations."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        out.extend(order[offset : offset + batch_size - len(out)])
    return out


def split_heldout(examples: list, cfg: dict) -> tuple[list, list]:
    """A seeded held-out split for evaluation during training (none when eval_every is 0)."""
    if not cfg["eval_every"]:
        return examples, []
    order = list(range(len(examples)))
    random.Random(cfg["seed"] + 7).shuffle(order)
    heldout = set(order[: cfg["eval_examples"]])
    return (
        [e for i, e in enumerate(examples) if i not in heldout],
        [e for i, e in enumerate(examples) if i in heldout],
    )


def planned_steps(n_examples: int, cfg: dict) -> int:
    """Optimizer steps of a run: `max_steps`, or `epochs` passes rounded up to whole steps."""
    if cfg.get("epochs"):
        return math.ceil(cfg["epochs"] * n_examples / cfg["batch_size"])
    return cfg["max_steps"]


def examples_read(n: int, cfg: dict) -> list[int]:
    """Indices (into the data file) of every example a run of `cfg` reads, sorted.

    Derived from the loop's own choices: `split_heldout` (the held-out examples are read at
    every evaluation) and `batch_indices`. The batches of steps 0..S-1 are consecutive slices
    of one stream of per-epoch permutations, so together they are that stream's first
    S x batch_size entries: `batch_indices` at step 0 with that size.
    """
    train_rows, heldout = split_heldout(list(range(n)), cfg)
    if not train_rows:
        return sorted(heldout)
    read = planned_steps(len(train_rows), cfg) * cfg["batch_size"]
    if read >= len(train_rows):  # at least one whole epoch: every training example
        return sorted(train_rows + heldout)
    first = batch_indices(len(train_rows), 0, read, cfg["seed"])
    return sorted({train_rows[i] for i in first} | set(heldout))


def length_grouped(indices: list[int], examples: list[tuple]) -> list[int]:
    """A global batch ordered by length (prompt and answer tokens), for `micro_batches`: each
    accumulation micro-batch then holds rows of similar length (little padding, even packed
    rows), and dealing it out rank by rank gives every process a similar share of tokens. The
    rows of the step are the same, each micro-batch as large as before, so the step's loss
    (a mean over pairs) is the same; only the float summation order changes."""
    return sorted(indices, key=lambda i: sum(len(part) for part in examples[i][:3]))


def micro_batches(indices: list[int], grad_accum: int, rank: int, world: int) -> list[list[int]]:
    """Cut a global batch into this rank's micro-batches (one per accumulation step)."""
    chunk = len(indices) // grad_accum
    chunks = [indices[i * chunk : (i + 1) * chunk] for i in range(grad_accum)]
    return [c[rank::world] for c in chunks]


# ---------------------------------------------------------------- objectives


def to_device(batch: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def sft_step(model, examples, idx, pad_id: int, cfg: dict) -> tuple[torch.Tensor, dict]:
    batch = to_device(collate([examples[i] for i in idx], pad_id), model)
    out = sequence_logps(model, batch)  # logps [N], n_tokens [N]
    n_tokens = out["n_tokens"].sum()
    loss = -out["logps"].sum() / n_tokens
    return loss, {"loss": loss.detach(), "tokens": n_tokens.float()}


class DPOObjective:
    """The DPO step: one forward over chosen+rejected, the reference from disk or a model."""

    def __init__(self, cfg: dict, reference_logps: dict | None, reference_model=None):
        self.cfg = cfg
        self.reference_logps = reference_logps  # {"chosen": [P], "rejected": [P]} by index
        self.reference_model = reference_model

    def reference(
        self, batch, logps_fn, idx: list[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_logps is not None:
            rows = torch.tensor(idx)
            return (
                self.reference_logps["chosen"][rows].to(device),
                self.reference_logps["rejected"][rows].to(device),
            )
        with torch.no_grad():
            return split_pair_logps(logps_fn(self.reference_model, batch)["logps"])

    def __call__(self, model, examples, idx, pad_id: int, cfg: dict) -> tuple[torch.Tensor, dict]:
        items = [examples[i] for i in idx]
        device = next(model.parameters()).device
        # dpo.packing: padded rows, or packed end to end (models/packing.py); either way the
        # outputs come back as 2B rows, chosen then rejected.
        batch, logps_fn = pair_inputs([e[:3] for e in items], pad_id, cfg["packing"], device)
        out = logps_fn(model, batch)
        policy_chosen, policy_rejected = split_pair_logps(out["logps"])  # [B], [B]
        len_chosen, len_rejected = split_pair_logps(out["n_tokens"].float())
        ref_chosen, ref_rejected = self.reference(batch, logps_fn, [e[3] for e in items], device)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            beta=cfg["beta"],
            loss_type=cfg["loss_type"],
            label_smoothing=cfg["label_smoothing"],
            chosen_lengths=len_chosen,
            rejected_lengths=len_rejected,
            simpo_gamma=cfg["simpo_gamma"],
        )
        loss = losses.mean()
        if cfg["rpo_alpha"] > 0:  # DPO + NLL on the chosen answer ("RPO")
            loss = loss + cfg["rpo_alpha"] * (-policy_chosen.sum() / len_chosen.sum())
        logits_chosen, logits_rejected = split_pair_logps(out["logits_mean"])
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
            "logits/chosen": logits_chosen.detach().mean(),
            "logits/rejected": logits_rejected.detach().mean(),
            "tokens": out["n_tokens"].sum().float(),
        }
        return loss, metrics


# ---------------------------------------------------------------- optimisation


def lr_lambda(cfg: dict):
    warmup, total, schedule = cfg["warmup_steps"], cfg["max_steps"], cfg["lr_schedule"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_optimizer(params, cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "rmsprop":  # the DPO paper's choice
        return torch.optim.RMSprop(
            params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"]
        )
    # fused: one kernel for the whole update, ~10x faster than the foreach path on CPU
    return torch.optim.AdamW(
        params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"], fused=True
    )


def deepspeed_config(job: dict, world: int) -> dict:
    cfg, dist_cfg = job["train"], job["distributed"]
    ds = json.loads((INFRA / f"zero{dist_cfg['zero_stage']}.json").read_text())
    ds.update(
        train_batch_size=cfg["batch_size"],
        train_micro_batch_size_per_gpu=cfg["batch_size"] // (cfg["grad_accum"] * world),
        gradient_accumulation_steps=cfg["grad_accum"],
        gradient_clipping=cfg["max_grad_norm"],
    )
    if dist_cfg["precision"] in ("bf16", "fp16"):
        ds[dist_cfg["precision"]] = {"enabled": True}
    return ds


# ---------------------------------------------------------------- the loop


@contextlib.contextmanager
def shm_op_skipped_when_alone():
    """Around `deepspeed.init_distributed`: in a one-process job, do not build DeepSpeed's
    shared-memory communication op.

    On the CPU accelerator DeepSpeed's TorchBackend builds that op (a C++ compile of minutes
    the first time, then a load) on every start. Its only use is `inference_all_reduce`
    (tensor-parallel layers) between the processes of a node, which returns before touching
    it when the world size is 1. So one process has nothing to share memory with, and None
    (what DeepSpeed itself uses where the op is incompatible) changes nothing else.
    Multi-process jobs still load it; `make setup` builds it once into the extensions cache.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        yield
        return
    import importlib

    # By name: `deepspeed.comm.torch` as an attribute is the torch package itself.
    ds_torch = importlib.import_module("deepspeed.comm.torch")
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def train(job: dict) -> dict:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    deepspeed = import_deepspeed()
    t_start = time.time()
    with shm_op_skipped_when_alone():
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = job["train"]
    out_dir, ckpt_dir = Path(job["output_dir"]), Path(job["checkpoint_dir"])
    metrics_path = Path(job["metrics_path"])
    # Before anything is loaded: a damaged checkpoint ends the job at once, on every rank.
    resume_tag = latest_checkpoint(ckpt_dir)
    if resume_tag is not None:
        verify_checkpoint(ckpt_dir, resume_tag, rank, world, dist)
    torch.manual_seed(cfg["seed"])

    # The hub revision of a hub model (None for a local folder: the folder is what it is).
    revision = job.get("model_revision")
    tokenizer = AutoTokenizer.from_pretrained(job["model_path"], revision=revision)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    # LoRA / QLoRA: the config's `model.lora` and `model.load_in_4bit` (absent: full fine-tuning).
    adapters = job.get("adapters") or {}
    load_in_4bit = bool(adapters.get("load_in_4bit"))
    model = lora.load_base_model(job["model_path"], revision=revision, load_in_4bit=load_in_4bit)
    model = lora.prepare(
        model,
        adapters.get("lora"),
        load_in_4bit=load_in_4bit,
        gradient_checkpointing=cfg["gradient_checkpointing"],
    )
    adapted = lora.is_adapted(model)
    pairs = read_pairs(job["data_path"])

    if job["kind"] == "sft":
        examples, objective = sft_examples(pairs, tokenizer, cfg), sft_step
    else:
        examples = dpo_examples(pairs, tokenizer, cfg)
        reference_logps, reference_model = None, None
        if job.get("reference_logps_path"):
            reference_logps = load_reference_logps(job["reference_logps_path"], pairs)
        else:
            reference_model = AutoModelForCausalLM.from_pretrained(
                job["model_path"], revision=revision
            ).eval()
            reference_model.requires_grad_(False)
            if torch.cuda.is_available():
                reference_model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        objective = DPOObjective(cfg, reference_logps, reference_model)
    examples, heldout = split_heldout(examples, cfg)
    cfg["max_steps"] = planned_steps(len(examples), cfg)  # `epochs` rounded up to steps
    probe_answers = None
    if job["kind"] == "dpo" and heldout and resume_tag is None:
        # The drift probe's answers (models/drift.py), sampled while the policy is still its
        # reference and before ZeRO-3 partitions it: every rank has the whole model here.
        probe_answers = sample_answers(
            model,
            tokenizer,
            [pairs[e[3]]["prompt"] for e in heldout],
            max_new_tokens=cfg["max_length"] - cfg["max_prompt_length"],
            batch_size=max(1, cfg["batch_size"] // world),
            seed=cfg["seed"],
        )

    optimizer = make_optimizer(lora.trainable_parameters(model), cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(job, world),
    )
    if world == 1 and job["distributed"]["zero_stage"] == 0:
        # With one process the all-reduce of the gradients is the identity, but ZeRO-0 still
        # runs it every step: it flattens every gradient into a new buffer (a second copy of
        # the gradients), all-reduces it over the one-process group and copies it back. On
        # 2 CPU cores that was ~13% of a 33 M-parameter model's step. The gradients are the
        # same bit for bit without it (a sum over one rank, divided by a world size of 1).
        engine.enable_backward_allreduce = False
        if job["distributed"]["precision"] == "fp32":
            add_embedding_grads_in_place(engine.module)

    if adapted:
        lora.checkpoint_adapters_only(engine)
    start_step = 0
    if resume_tag is not None:
        # An adapted model's checkpoint holds the adapters only; the frozen base is loaded above.
        _, client_state = engine.load_checkpoint(
            str(ckpt_dir), tag=resume_tag, load_module_strict=not adapted
        )
        start_step = int(client_state["step"])
        torch.set_rng_state(client_state["rng"])
    probe = drift_probe(
        engine,
        probe_answers,
        metrics_path.with_name(SAMPLES_FILE),
        pad_id,
        batch_size=max(1, cfg["batch_size"] // world),
        rank=rank,
    )
    if rank == 0:
        truncate_metrics(metrics_path, start_step)
        print(
            f"[{job['kind']}] {len(examples)} examples, {world} process(es), "
            f"steps {start_step}->{cfg['max_steps']}",
            flush=True,
        )

    rate_name = "pairs_per_s" if job["kind"] == "dpo" else "sequences_per_s"
    progress = Progress(
        f"[{job['kind']}] training",
        cfg["max_steps"],
        "steps",
        log=(lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None),
        already=start_step,
    )
    seen_examples, seen_tokens, t_loop = 0, 0.0, time.time()
    last: dict[str, float] = {}
    trim_heap = heap_trimmer()
    # DeepSpeed's ZeRO, bf16 and fp16 optimizer wrappers record the global gradient norm; with
    # ZeRO-0 in fp32 it keeps the plain torch optimizer, which does not: the loop measures it.
    own_norm = isinstance(engine.optimizer, torch.optim.Optimizer)
    # `from_pretrained` hands the model over in eval mode, and dropout and activation
    # checkpointing act only in train mode: without this the steps before the first held-out
    # evaluation (all of them when there is none) kept every activation and dropped nothing.
    engine.module.train()
    for step in range(start_step, cfg["max_steps"]):
        global_idx = batch_indices(len(examples), step, cfg["batch_size"], cfg["seed"])
        if cfg.get("group_by_length"):  # DPO's: its loss is a mean over pairs (see docstring)
            global_idx = length_grouped(global_idx, examples)
        step_metrics: dict[str, torch.Tensor] = {}
        for idx in micro_batches(global_idx, cfg["grad_accum"], rank, world):
            loss, metrics = objective(engine.module, examples, idx, pad_id, cfg)
            if trim_heap is not None:
                trim_heap()
            engine.backward(loss)
            if own_norm and engine.is_gradient_accumulation_boundary():
                # Before step() clips and clears them; all-reduced by now (ZeRO-0 does it in
                # the boundary's backward), so every rank measures the global norm.
                norm = gradient_norm(engine.module)
            engine.step()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0) + v.detach().float() / cfg["grad_accum"]
        last = reduce_metrics(step_metrics, world, dist)
        seen_examples += cfg["batch_size"]
        seen_tokens += last.pop("tokens") * cfg["grad_accum"]
        elapsed = max(time.time() - t_loop, 1e-9)
        last.update(
            grad_norm=norm if own_norm else float(engine.get_global_grad_norm()),
            learning_rate=scheduler.get_last_lr()[0],
            **{rate_name: seen_examples / elapsed},
            tokens_per_s=seen_tokens / elapsed,
        )
        if heldout and (step + 1) % cfg["eval_every"] == 0:
            last.update(evaluate_heldout(engine, objective, heldout, pad_id, cfg, world, probe))
        stop_if_orphaned(job, step + 1)
        if rank == 0:
            append_metrics(metrics_path, step + 1, last)
            progress.update(step + 1, f"loss {last['loss']:.4f} {rate_name} {last[rate_name]:.1f}")
        if (step + 1) % cfg["checkpoint_every"] == 0 and step + 1 < cfg["max_steps"]:
            save_checkpoint(engine, ckpt_dir, step + 1, rank, trainable_only=adapted)

    save_model(engine, tokenizer, out_dir, job, rank)
    result = {
        "kind": job["kind"],
        "steps": cfg["max_steps"],
        "resumed_from_step": start_step,
        "world_size": world,
        "optimizer": type(optimizer).__name__,  # DeepSpeed's wrapper, if any, around AdamW
        "final_metrics": last,
        "seconds": time.time() - t_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if rank == 0:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    dist.barrier()
    dist.destroy_process_group()  # a clean teardown: ZeRO-3 aborts at exit without it
    return result


def gradient_norm(model: torch.nn.Module) -> float:
    """The L2 norm of all of the model's gradients together, as clipping measures it."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


@torch.no_grad()
def evaluate_heldout(
    engine,
    objective,
    heldout: list,
    pad_id: int,
    cfg: dict,
    world: int,
    probe: DriftProbe | None = None,
) -> dict:
    """Mean loss and metrics on the held-out examples (every rank runs all of them:
    under ZeRO-3 every rank must take part in each forward pass); for DPO also the answers'
    lengths and, with a drift probe, the KL estimate `kl_ref_policy` (models/drift.py)."""
    engine.module.eval()
    per_batch = max(1, cfg["batch_size"] // world)
    totals: dict[str, float] = {}
    batches = range(0, len(heldout), per_batch)
    for start in batches:
        idx = list(range(start, min(start + per_batch, len(heldout))))
        _, metrics = objective(engine.module, heldout, idx, pad_id, cfg)
        if isinstance(objective, DPOObjective):  # mean answer tokens, beside the drift curve
            for name, column in (("length/chosen", 1), ("length/rejected", 2)):
                metrics[name] = sum(len(heldout[i][column]) for i in idx) / len(idx)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(batches)
    if probe is not None:
        totals["kl_ref_policy"] = probe.kl(engine.module, pad_id, per_batch)
    engine.module.train()
    totals.pop("tokens", None)
    return {f"eval/{k}": v for k, v in totals.items()}


def drift_probe(
    engine, answers: list | None, path: Path, pad_id: int, *, batch_size: int, rank: int
) -> DriftProbe | None:
    """The held-out drift probe: recorded now from freshly sampled `answers` (the policy is
    still its reference), or the one a resumed job recorded at its step 0; None without one."""
    if answers is None:
        return DriftProbe.load(path)
    probe = DriftProbe.record(engine.module, answers, pad_id, batch_size)
    if rank == 0:
        probe.save(path)
    return probe


def stop_if_orphaned(job: dict, step: int) -> None:
    """End this job's process group when the pipeline that started it was killed.

    A SIGKILLed `dpoflow run` cannot end its children; without this check the job
    would go on training into the partial folder that the next run resumes from.
    """
    owner = job.get("owner_pid")
    if not owner:
        return
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        print(
            f"[{job['kind']}] the pipeline that started this job is gone; stopping at step "
            f"{step} (the newest checkpoint is kept for the next run)",
            flush=True,
        )
        os.killpg(os.getpgrp(), signal.SIGTERM)


def load_reference_logps(path: str, pairs: list[dict]) -> dict[str, torch.Tensor]:
    """Reference log-probs stored by example id, re-ordered to this data's order.

    The reference stage stores only the pairs this run reads (`examples_read`); the others are
    NaN, so a pair read by mistake makes the loss NaN at once instead of training on nothing.
    """
    stored = read_reference_logps(path)
    row = {example_id: i for i, example_id in enumerate(stored["ids"])}
    at = torch.tensor([row.get(i, -1) for i in pair_ids(pairs)], dtype=torch.long)  # [P]
    found = at >= 0
    out = {}
    for side in ("chosen", "rejected"):
        values = torch.full((len(pairs),), float("nan"))  # [P]
        values[found] = stored[side][at[found]].float()
        out[side] = values
    return out


def reduce_metrics(metrics: dict[str, torch.Tensor], world: int, dist) -> dict[str, float]:
    """Average each metric over ranks (token counts are summed)."""
    names = sorted(metrics)
    values = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32) for k in names])
    if world > 1:
        dist.all_reduce(values)
        values = torch.where(torch.tensor([k == "tokens" for k in names]), values, values / world)
    return {k: float(v) for k, v in zip(names, values, strict=True)}


def append_metrics(path: Path, step: int, metrics: dict[str, float]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")


def truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop the metrics of steps after the checkpoint: they will be redone.

    The file is replaced, not rewritten in place, so a reader tailing it sees a new
    file (a new inode) rather than a shorter one that may already have grown again.
    """
    if not path.exists():
        return
    text = path.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()  # a line cut by a kill has no newline
    keep = [line for line in lines if json.loads(line)["step"] <= start_step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def save_checkpoint(
    engine, ckpt_dir: Path, step: int, rank: int, trainable_only: bool = False
) -> None:
    """A resume point: the checkpoint, then its files' sha256, then `latest` naming it.

    `trainable_only` (LoRA): the frozen base is left out; it is the model the job starts from.

    `latest` is written here rather than by DeepSpeed so that it only ever names a checkpoint
    whose hashes are recorded: a kill in between leaves the previous checkpoint to resume from.
    """
    tag = f"step{step}"
    engine.save_checkpoint(
        str(ckpt_dir),
        tag=tag,
        client_state={"step": step, "rng": torch.get_rng_state()},
        save_latest=False,
        exclude_frozen_parameters=trainable_only,
    )
    # DeepSpeed's save ends with a barrier, so every rank's files of this tag are complete.
    if rank == 0:
        write_atomic(ckpt_dir / tag / CHECKPOINT_HASHES, json.dumps(file_hashes(ckpt_dir / tag)))
        write_atomic(ckpt_dir / "latest", tag)
        # keep the newest two: the latest, and one in case it is damaged
        tags = sorted(
            (p for p in ckpt_dir.glob("step*") if p.is_dir()), key=lambda p: int(p.name[4:])
        )
        for old in tags[:-2]:
            shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    """Write a whole file or nothing: a reader never sees it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(folder: Path) -> list[str]:
    """The files of a checkpoint tag (relative, sorted), its hash file aside."""
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != CHECKPOINT_HASHES
    )


def file_hashes(folder: Path) -> dict[str, str]:
    return {name: sha256_of(folder / name) for name in checkpoint_files(folder)}


def latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is nothing to resume from."""
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def verify_checkpoint(ckpt_dir: Path, tag: str, rank: int, world: int, dist) -> None:
    """Raise CheckpointRefused unless every file of the checkpoint matches its recorded sha256.

    DeepSpeed loads checkpoints with torch.load(weights_only=False), which runs whatever a
    pickle says, from a work directory a team shares: a file changed since it was written is
    never loaded. Each rank hashes a share of the files; any mismatch stops every rank.
    """
    folder = ckpt_dir / tag
    start_over = f"delete {ckpt_dir.parent} to start this stage over"
    hashes = folder / CHECKPOINT_HASHES
    if not re.fullmatch(r"step\d+", tag) or not hashes.is_file():
        raise CheckpointRefused(
            f"checkpoint {folder} has no {CHECKPOINT_HASHES} recorded when it was written, so "
            f"it cannot be verified and was not resumed: {start_over}."
        )
    try:
        recorded = json.loads(hashes.read_text())
    except ValueError:
        recorded = {}
    names = sorted(set(recorded) | set(checkpoint_files(folder)))
    mismatched = [
        name
        for name in names[rank::world]
        if not (folder / name).is_file() or recorded.get(name) != sha256_of(folder / name)
    ]
    flag = torch.tensor([float(bool(mismatched) or not recorded)])
    if world > 1:
        if torch.cuda.is_available():  # NCCL reduces GPU tensors only
            flag = flag.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        dist.all_reduce(flag)
    if flag.item() > 0:
        raise CheckpointRefused(
            f"checkpoint {folder} does not match the sha256 recorded when it was written (a file "
            f"was changed, added or removed), so it was not resumed: {start_over}."
        )


def save_model(engine, tokenizer, out_dir: Path, job: dict, rank: int) -> None:
    """Save an ordinary Hugging Face folder (ZeRO-3 gathers the partitioned weights first).

    With LoRA the folder holds the base with the adapters merged in, and the adapter alone
    goes beside it (`models/lora.py`).
    """
    zero3 = job["distributed"]["zero_stage"] == 3
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else None
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if lora.is_adapted(engine.module):
            lora.save_merged(
                engine.module,
                out_dir,
                base_path=job["model_path"],
                revision=job.get("model_revision"),
                state_dict=state_dict,
            )
            tokenizer.save_pretrained(out_dir.parent / lora.ADAPTER_DIR)
        else:
            if state_dict is None:
                state_dict = engine.module.state_dict()
            engine.module.save_pretrained(out_dir, state_dict=state_dict)
        tokenizer.save_pretrained(out_dir)


def worker_args(description: str) -> argparse.Namespace:
    """The command line every worker the launcher starts takes (`--job`, and `--local_rank`
    from the launcher), with torch held to this process's share of the cores."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help="job JSON written by the stage")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args()
    threads = os.environ.get("DPOFLOW_THREADS")
    if threads:  # the launcher's share of the cores for each process
        torch.set_num_threads(int(threads))
    return args


def main() -> None:
    freeze_objects_at_exit()
    args = worker_args("dpoflow training worker (SFT or DPO)")
    try:
        train(json.loads(Path(args.job).read_text()))
    except CheckpointRefused as refusal:
        # Not a crash to retry: the same files would be refused again. The launcher reads
        # the sentence from JOB_ERROR and raises it as the user's error.
        if int(os.environ.get("RANK", "0")) == 0:
            error = {"error": "checkpoint", "message": str(refusal)}
            write_atomic(Path(args.job).with_name(JOB_ERROR), json.dumps(error))
        print(f"[error] {refusal}", flush=True)
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


if __name__ == "__main__":
    main()
