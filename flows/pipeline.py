"""The DPO pipeline as a Prefect flow: it reads like the diagram.

    validate ─► sft ─► reference log-probs ─► dpo ─► evaluate ─► register ─► promote

Each stage is a task cached on a key made of its config section, its inputs'
content hashes and its code version (`tasks.stage.stage_key`): change β and
only dpo, evaluate and register run again; change the data and all of them do.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.config import PipelineConfig
from flows.errors import ConfigError, hide_user_error_tracebacks
from tasks import evaluate as evaluate_stage
from tasks import promote as promote_stage
from tasks import register as register_stage
from tasks import training
from tasks import validate as validate_stage
from tasks.sources import fingerprint, resolve_data, resolve_model
from tasks.stage import MANIFEST, code_version, stage_key

hide_user_error_tracebacks()  # a bad config or bad data is reported in one sentence


STAGES = ("validate", "sft", "reference", "dpo", "evaluate", "register", "promote")


def check_stage_name(until: str | None) -> None:
    if until is not None and until not in STAGES:
        raise ConfigError(
            f"unknown stage {until!r} for --until: choose one of {', '.join(STAGES)}."
        )


class StoppedAfter(Exception):
    """Raised by the runner after the stage the user asked to stop at (`--until`)."""


class StageRunner:
    """Calls stage tasks, times them, and records whether each ran or came from the cache.

    With `until`, it stops the flow (raises `StoppedAfter`) once that stage is done."""

    def __init__(self, workdir: Path, until: str | None = None):
        self.workdir = workdir
        self.until = until
        self.stages: dict[str, dict[str, Any]] = {}

    def __call__(self, name: str, task, **params) -> dict[str, Any]:
        started = time.perf_counter()
        storage = self.workdir / "prefect-results"
        state = task.with_options(result_storage=storage)(**params, return_state=True)
        result = state.result(raise_on_failure=False)
        if state.is_completed() and not (Path(result["manifest"]["path"]) / MANIFEST).is_file():
            # A cache hit for an output deleted since: build it again.
            state = task.with_options(result_storage=storage, refresh_cache=True)(
                **params, return_state=True
            )
            result = state.result(raise_on_failure=False)
        if isinstance(result, BaseException):
            raise result
        cached = state.name == "Cached" or result["reused"]
        manifest = result["manifest"]
        self.stages[name] = {
            "status": "cached" if cached else "completed",
            "seconds": round(time.perf_counter() - started, 3),
        }
        for resumed in (k for k in manifest if k.startswith("resumed_")):
            # How much of the work an earlier, interrupted attempt had done.
            self.stages[name][resumed] = 0 if cached else manifest[resumed]
        if name == self.until:
            raise StoppedAfter(name)
        return manifest


def _dump(section, exclude: set[str] | None = None) -> dict[str, Any]:
    return section.model_dump(mode="json", exclude=exclude)


# How a job is run, not what it computes: left out of the cache keys.
RUN_ONLY = {"master_port", "timeout_seconds"}


@flow(name="dpo-pipeline", log_prints=True)
def dpo_pipeline(
    config: dict[str, Any],
    workdir: str = ".dpoflow",
    parent_run_id: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """validate -> sft -> reference -> dpo -> evaluate -> register -> promote; returns the
    run's summary. `until` names the last stage to run (the later ones run next time)."""
    check_stage_name(until)
    cfg = PipelineConfig.model_validate(config)
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = StageRunner(work, until)
    try:
        return _run_stages(cfg, run, work, parent_run_id)
    except StoppedAfter:
        get_run_logger().info("stopped after %s as asked; run without --until to go on", until)
        return {"stages": run.stages, "stopped_after": until}


def _run_stages(
    cfg: PipelineConfig, run: StageRunner, work: Path, parent_run_id: str | None
) -> dict[str, Any]:
    logger = get_run_logger()

    # Resolve the inputs: the embedded default is made here on first use.
    model_path = resolve_model(cfg.model.base, work)
    train = resolve_data(cfg.data.train, work)
    eval_prompts = resolve_data(cfg.data.eval_prompts, work, eval_prompts=True)
    data_inputs = {
        "train": fingerprint(train, cfg.data.revision),
        "eval_prompts": fingerprint(eval_prompts),
        "tokenizer": fingerprint(model_path, cfg.model.revision),
    }
    data = run(
        "validate",
        validate_stage.validate,
        key=stage_key(
            "validate",
            _dump(cfg.data) | {"max_length": cfg.dpo.max_length},
            data_inputs,
            code_version("tasks/validate.py", "data_checks/loading.py", "data_checks/suite.py"),
        ),
        workdir=str(work),
        data=_dump(cfg.data),
        train=train,
        eval_prompts=eval_prompts,
        model_path=model_path,
        max_length=cfg.dpo.max_length,
        inputs=data_inputs,
    )

    sft_inputs = {"data": data["data_sha256"], "base_model": fingerprint(model_path)}
    sft = run(
        "sft",
        training.sft,
        key=stage_key(
            "sft",
            _dump(cfg.sft) | {"distributed": _dump(cfg.distributed, RUN_ONLY)},
            sft_inputs,
            code_version(*training.TRAINING_CODE),
        ),
        workdir=str(work),
        section=_dump(cfg.sft),
        distributed=_dump(cfg.distributed),
        mlflow_cfg=_dump(cfg.mlflow),
        model_path=model_path,
        data_manifest=data,
        inputs=sft_inputs,
    )

    # The reference depends on tokenization limits only, never on β.
    reference = None
    if cfg.dpo.reference == "precomputed":
        ref_section = {
            "max_length": cfg.dpo.max_length,
            "max_prompt_length": cfg.dpo.max_prompt_length,
            "batch_size": 64,
            "precision": cfg.distributed.precision,  # the weights the policy starts from
        }
        ref_inputs = {"data": data["data_sha256"], "sft": sft["sha256"]}
        reference = run(
            "reference",
            training.reference,
            key=stage_key(
                "reference",
                ref_section,
                ref_inputs,
                code_version("models/reference.py", "models/logprobs.py"),
            ),
            workdir=str(work),
            section=ref_section,
            sft_manifest=sft,
            data_manifest=data,
            inputs=ref_inputs,
        )

    dpo_inputs = {
        "data": data["data_sha256"],
        "sft": sft["sha256"],
        "reference": reference["sha256"] if reference else "on-the-fly",
    }
    dpo_section = {"dpo": _dump(cfg.dpo), "distributed": _dump(cfg.distributed, RUN_ONLY)}
    policy = run(
        "dpo",
        training.dpo,
        key=stage_key(
            "dpo",
            dpo_section | {"parent": parent_run_id},
            dpo_inputs,
            code_version(*training.TRAINING_CODE),
        ),
        workdir=str(work),
        config=cfg.model_dump(mode="json"),
        sft_manifest=sft,
        data_manifest=data,
        reference_manifest=reference,
        inputs=dpo_inputs,
        parent_run_id=parent_run_id,
    )

    eval_inputs = {
        "policy": policy["sha256"],
        "reference": sft["sha256"],
        "prompts": data["data_sha256"],
    }
    evaluation = run(
        "evaluate",
        evaluate_stage.evaluate,
        key=stage_key(
            "evaluate",
            _dump(cfg.eval),
            eval_inputs,
            code_version(
                "tasks/evaluate.py",
                "models/evaluation.py",
                "models/generation.py",
                "models/judges.py",
                "models/llm_judge.py",
                "models/logprobs.py",
            ),
        ),
        workdir=str(work),
        section=_dump(cfg.eval),
        mlflow_cfg=_dump(cfg.mlflow),
        dpo_manifest=policy,
        sft_manifest=sft,
        data_manifest=data,
        inputs=eval_inputs,
    )

    reg_inputs = {"policy": policy["sha256"], "evaluation": evaluation["sha256"]}
    registered = run(
        "register",
        register_stage.register,
        key=stage_key(
            "register",
            _dump(cfg.registry),
            reg_inputs,
            code_version("tasks/register.py", "models/serving.py"),
        ),
        workdir=str(work),
        section=_dump(cfg.registry),
        mlflow_cfg=_dump(cfg.mlflow),
        dpo_manifest=policy,
        sft_manifest=sft,
        data_manifest=data,
        eval_manifest=evaluation,
        inputs=reg_inputs,
    )

    promo_inputs = {"version": f"{registered['name']}:{registered['version']}"}
    promoted = run(
        "promote",
        promote_stage.promote,
        key=stage_key(
            "promote",
            _dump(cfg.eval),
            promo_inputs,
            code_version("tasks/promote.py", "tasks/registry.py", "models/promotion.py"),
        ),
        workdir=str(work),
        section=_dump(cfg.eval),
        mlflow_cfg=_dump(cfg.mlflow),
        register_manifest=registered,
        data_manifest=data,
        inputs=promo_inputs,
    )

    summary = {
        "stages": run.stages,
        "win_rate": evaluation["win_rate"],
        "win_rate_ci": evaluation["win_rate_ci"],
        "reward_policy": evaluation["reward_policy"],
        "reward_reference": evaluation["reward_reference"],
        "kl": evaluation["kl"],
        "mlflow_run_id": policy["mlflow_run_id"],
        "registered_model": {k: promoted[k] for k in ("name", "version", "aliases")}
        | {"promoted": promoted["promoted"], "promotion_reason": promoted["reason"]},
        "beta": cfg.dpo.beta,
        "loss_type": cfg.dpo.loss_type,
    }
    logger.info(
        "win rate %.3f %s, KL %.3f", summary["win_rate"], summary["win_rate_ci"], summary["kl"]
    )
    return summary
