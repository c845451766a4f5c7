"""Stage 3: the reference model's log-probs of every training pair, computed once.

The reference is frozen, so its log-probs depend only on (SFT model, data,
tokenization limits, precision), never on β: stored here, they serve every β of
a sweep and every epoch of DPO without holding a second model in memory.
"""

from __future__ import annotations

from pathlib import Path

from dpoflow.tasks.common import Stage, build_once, stage_logger, stage_task


@stage_task("reference")
def reference(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    import torch

    from dpoflow.models.reference import compute_reference_logps

    logger = stage_logger()
    sft, data = upstream["sft"], upstream["validate"]

    def build(partial: Path) -> dict:
        next_report = 0

        def progress(done: int, total: int) -> None:  # at the start, every tenth, at the end
            nonlocal next_report
            if done >= next_report or done == total:
                logger.info("reference log-probs: %d / %d pairs", done, total)
                next_report = done + max(1, total // 10)

        stored = compute_reference_logps(
            str(Path(sft["path"]) / sft["model"]),
            Path(data["path"]) / "pairs.jsonl",
            max_length=section["max_length"],
            max_prompt_length=section["max_prompt_length"],
            precision=section["precision"],
            progress=progress,
        )
        torch.save(stored, partial / "reference_logps.pt")
        return {"logps": "reference_logps.pt", "n_pairs": len(stored["ids"])}

    return build_once("reference", key, workdir, section, upstream, build)


STAGE = Stage(
    name="reference",
    task=reference,
    # Tokenization limits and the precision the policy starts from; never β.
    reads=lambda cfg, _: {
        "max_length": cfg.dpo.max_length,
        "max_prompt_length": cfg.dpo.max_prompt_length,
        "precision": cfg.distributed.precision,
    },
    inputs={"data": "validate.data_sha256", "sft": "sft.sha256"},
    enabled=lambda cfg: cfg.dpo.reference == "precomputed",
)
