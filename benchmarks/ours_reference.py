"""Our reference stage, in its own process: the reference log-probs of every pair of the run.

The pipeline computes them once (the `reference` stage, models/reference.py, with its default
batch of 64 pairs) and the training job, a separate process started afterwards, only reads the
stored file. The bench does the same: this process computes and stores them, then
`benchmarks.ours_side` trains from the file. The two processes run one after the other, so our
peak resident memory is the larger of the two peaks. The time of its forward passes (from the
model loaded to the log-probs saved) is added to our training time, prorated to the timed pairs,
by benchmarks/dpo_bench.py; its start-up (imports, tokenizer and model load) is not, just as
TRL's timed window starts after its models are loaded. The report prints the start-up apart.

    python -m benchmarks.ours_reference SPEC.json OUT.json
"""

from __future__ import annotations

import time

import torch

from benchmarks.bench_common import Spec, child_main
from dpoflow.models.reference import compute_reference_logps


def run(spec: Spec) -> dict:
    marks: list[float] = []  # when each progress call came: loaded, then after each batch
    t0 = time.perf_counter()
    stored = compute_reference_logps(
        spec["model"],
        spec["data"],
        max_length=spec["max_length"],
        max_prompt_length=spec["max_prompt_length"],
        precision=spec.get("precision", "fp32"),
        load_in_4bit=bool(spec.get("load_in_4bit")),  # QLoRA's reference: the NF4 base
        progress=lambda done, total: marks.append(time.perf_counter()),
    )
    torch.save(stored, spec["reference_logps_path"])
    done = time.perf_counter()
    return {
        # The forward passes and the save: counted (prorated) in our time, as TRL's time
        # counts its reference forward passes.
        "seconds": done - marks[0],
        # Imports, tokenizer, model and data load: not counted, as TRL's start-up is not.
        "startup_seconds": marks[0] - t0,
        "pairs": len(stored["ids"]),
    }


if __name__ == "__main__":
    child_main(run)
