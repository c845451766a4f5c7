"""The reference stage's job, run under the `deepspeed` launcher like training:

    deepspeed --num_gpus N --module dpoflow.models.reference_worker --job job.json

(by hand; `tasks/launcher.py` starts DeepSpeed's node launcher directly on one machine,
one process fewer: `models/node_launcher.py`).

It scores only the pairs the DPO run of the job's `train` section will read
(`trainer.examples_read`), in chunks of `chunk_pairs` pairs: the pairs, shortest first,
are cut into chunks and chunk c goes to rank c mod world. Each finished chunk is a
safetensors file beside the sha256 it was written with; a killed job run again reuses
every chunk whose file still matches its sha256 and its planned pairs, and scores the
rest. When all are there, rank 0 joins them into `reference_logps.safetensors`.
"""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path

import torch

from dpoflow.models.progress import Progress
from dpoflow.models.reference import (
    TokenizedPair,
    by_length,
    load_reference_model,
    pair_ids,
    save_reference_logps,
    score_pairs,
    tokenize_pairs,
)
from dpoflow.models.trainer import (
    examples_read,
    read_pairs,
    sha256_of,
    stop_if_orphaned,
    worker_args,
    write_atomic,
)
from dpoflow.process_gc import freeze_objects_at_exit

OUTPUT = "reference_logps.safetensors"
# A test's fault hook: the job exits after writing this many chunks, as a kill would end it.
EXIT_AFTER_CHUNKS = "DPOFLOW_FAULT_REFERENCE_EXIT_AFTER_CHUNKS"


def plan_chunks(tokenized: dict[int, TokenizedPair], chunk_pairs: int) -> list[list[int]]:
    """The pair indices of each chunk: shortest pairs first, `chunk_pairs` a chunk."""
    indices = sorted(tokenized)
    order = by_length([tokenized[i] for i in indices])
    ordered = [indices[i] for i in order]
    return [ordered[s : s + chunk_pairs] for s in range(0, len(ordered), chunk_pairs)]


def chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:05d}.safetensors"


def finished_chunk(folder: Path, chunk: int, planned: list[int]) -> dict | None:
    """A chunk's tensors when its file matches the sha256 written with it and holds exactly
    its planned pairs; None when it must be scored (again)."""
    from safetensors.torch import load_file

    path = chunk_path(folder, chunk)
    digest = path.with_suffix(".sha256")
    if not (path.is_file() and digest.is_file()):
        return None
    if digest.read_text().strip() != sha256_of(path):
        return None
    tensors = load_file(str(path))
    if tensors["index"].tolist() != planned:
        return None
    return tensors


def write_chunk(folder: Path, chunk: int, tensors: dict[str, torch.Tensor]) -> None:
    """The chunk's file, then its sha256: a kill in between leaves a chunk that is redone."""
    from safetensors.torch import save_file

    path = chunk_path(folder, chunk)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
    write_atomic(path.with_suffix(".sha256"), sha256_of(path))


def run(job: dict) -> dict:
    """Score this rank's chunks; rank 0 then writes the joined file and result.json."""
    import torch.distributed as dist

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # gloo: only barriers go between the ranks, never tensors
        # A rank waits at the last barrier for the slowest share, which may take longer than
        # gloo's default 30 min; a rank that dies makes the launcher end the others anyway.
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    t_start = time.time()
    cfg, out_dir = job["train"], Path(job["output_dir"])
    chunks_dir = Path(job["chunks_dir"])
    chunks_dir.mkdir(parents=True, exist_ok=True)
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    model, tokenizer, pad_id = load_reference_model(
        job["model_path"],
        job["distributed"]["precision"],
        device,
        job.get("model_revision"),
        load_in_4bit=bool(job.get("load_in_4bit")),
    )
    pairs = read_pairs(job["data_path"])
    needed = examples_read(len(pairs), cfg)
    limits = dict(max_length=cfg["max_length"], max_prompt_length=cfg["max_prompt_length"])
    tokens = tokenize_pairs(tokenizer, [pairs[i] for i in needed], **limits)
    tokenized = dict(zip(needed, tokens, strict=True))  # pair index -> its token ids
    plan = plan_chunks(tokenized, job["chunk_pairs"])
    mine = list(range(rank, len(plan), world))

    reused = [c for c in mine if finished_chunk(chunks_dir, c, plan[c]) is not None]
    todo = [c for c in mine if c not in reused]
    share = sum(len(plan[c]) for c in mine)
    done = sum(len(plan[c]) for c in reused)
    if rank == 0:
        print(
            f"[reference] {len(needed)} of {len(pairs)} pairs are read by training, "
            f"{len(plan)} chunk(s) over {world} process(es), {len(reused)} of rank 0's "
            f"{len(mine)} reused",
            flush=True,
        )
    progress = Progress(
        "[reference] log-probs" + (f" (rank 0, 1 of {world} shares)" if world > 1 else ""),
        share,
        "pairs",
        log=(lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None),
        already=done,
    )

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        progress.update(done)

    stop_after = int(os.environ.get(EXIT_AFTER_CHUNKS, "0"))
    for written, c in enumerate(todo, start=1):
        chosen, rejected = score_pairs(
            model, [tokenized[i] for i in plan[c]], pad_id, on_batch=on_batch
        )
        index = torch.tensor(plan[c], dtype=torch.long)
        write_chunk(chunks_dir, c, {"index": index, "chosen": chosen, "rejected": rejected})
        stop_if_orphaned({**job, "kind": "reference"}, written)
        if stop_after and written >= stop_after:
            print(f"[reference] {EXIT_AFTER_CHUNKS}: exiting after {written} chunk(s)", flush=True)
            os._exit(3)

    if world > 1:
        dist.barrier()  # every rank's chunks are written
    result = {
        "n_pairs": len(needed),
        "n_file_pairs": len(pairs),
        "chunks": len(plan),
        "reused_chunks": len(reused),
        "world_size": world,
        "seconds": time.time() - t_start,
    }
    if rank == 0:
        save_reference_logps(out_dir / OUTPUT, joined(chunks_dir, plan, pair_ids(pairs)))
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def joined(chunks_dir: Path, plan: list[list[int]], ids: list[str]) -> dict:
    """Every chunk, verified again, joined in file order: {"ids", "chosen", "rejected"}."""
    parts = []
    for c, planned in enumerate(plan):
        tensors = finished_chunk(chunks_dir, c, planned)
        if tensors is None:
            raise RuntimeError(f"chunk {c} is missing or damaged after every rank finished")
        parts.append(tensors)
    index = torch.cat([p["index"] for p in parts]) if parts else torch.zeros(0, dtype=torch.long)
    order = torch.argsort(index)
    out: dict = {"ids": [ids[i] for i in index[order].tolist()]}
    for side in ("chosen", "rejected"):
        values = torch.cat([p[side] for p in parts]) if parts else torch.zeros(0)
        out[side] = values[order]
    return out


def main() -> None:
    freeze_objects_at_exit()
    args = worker_args("dpoflow reference log-probs worker")
    run(json.loads(Path(args.job).read_text()))


if __name__ == "__main__":
    main()
