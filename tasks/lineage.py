"""What an MLflow run says about itself beyond its metrics: where it came from (source,
git commit, user), the data it read (dataset inputs), the runs it is linked to, and
its description (the `mlflow.note.content` tag MLflow shows above a run).

Every helper takes the tracking URI and a run id, so the stage tasks call them at the
point where they know the fact, and MLflow's own columns (Source, Version, User,
Dataset, Description) are filled instead of left empty.
"""

from __future__ import annotations

import getpass
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dpoflow.tasks.common import stage_logger
from dpoflow.tasks.tracking import NOT_FOUND, client, registry_lookup

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DESCRIPTION = "mlflow.note.content"  # MLflow's tag for a run's description (Markdown)
# Tags that link an SFT run and the DPO runs trained from it, in both directions.
SFT_RUN_ID = "dpoflow.sft_run_id"
SFT_RUN_LINK = "dpoflow.sft_run_link"
DPO_RUN_PREFIX = "dpoflow.dpo_run."  # + the DPO run's id; the value is its link


def git_commit() -> str:
    """The commit the project's code is at, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def source_tags(stage: str) -> dict[str, str]:
    """The tags MLflow shows as a run's Source, Version and User: a run created through
    `MlflowClient.create_run` gets none of them by itself."""
    tags = {"mlflow.source.name": f"dpoflow {stage}", "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):  # a container user with no name: MLflow shows none either
        pass
    commit = git_commit()
    if commit != "unknown":  # MLflow shows the value as a version: never a placeholder
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_link(uri: str, run_id: str) -> str:
    """Where the run opens in the MLflow UI: a full URL on a tracking server, else the
    UI's own path (`#/experiments/<id>/runs/<run>`), which the UI of `mlflow ui` on the
    same store opens, and which works as a link in a run's Markdown description."""
    run = client(uri).get_run(run_id)
    path = f"#/experiments/{run.info.experiment_id}/runs/{run_id}"
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/{path}"
    return path


@dataclass(frozen=True)
class DataRef:
    """A data file a run read, as MLflow's Dataset column and lineage show it."""

    name: str
    path: Path
    sha256: str
    rows: int
    columns: tuple[str, ...]
    context: str  # "training" or "evaluation": MLflow's `mlflow.data.context` input tag


def log_datasets(uri: str, run_id: str, refs: list[DataRef]) -> None:
    """Record `refs` as the run's dataset inputs (name, digest, source, row count, schema).

    The entities are built from what validation measured, so nothing is read again; MLflow
    keeps one dataset per (name, digest) in an experiment, so a resumed run logs nothing
    twice."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = [
        DatasetInput(
            Dataset(
                name=ref.name,
                digest=ref.sha256[:16],  # MLflow stores at most 36 characters
                source_type="local",
                source=json.dumps({"uri": ref.path.resolve().as_uri()}),
                schema=json.dumps(
                    {"mlflow_colspec": [{"type": "string", "name": c} for c in ref.columns]}
                ),
                profile=json.dumps({"num_rows": ref.rows, "sha256": ref.sha256}),
            ),
            tags=[InputTag("mlflow.data.context", ref.context)],
        )
        for ref in refs
    ]
    client(uri).log_inputs(run_id, datasets=inputs)


def validated_data(validate: dict) -> list[DataRef]:
    """The validate stage's outputs as dataset inputs: the pairs trained on and the
    held-out prompts evaluated on, named after the configured training data."""
    folder = Path(validate["path"])
    name = data_name(validate["config"]["data"]["train"])
    prompts = folder / "eval_prompts.jsonl"
    with open(prompts, encoding="utf-8") as f:
        prompt_columns = tuple(json.loads(f.readline() or "{}"))
    return [
        DataRef(
            name=f"{name} (pairs)",
            path=folder / "pairs.jsonl",
            sha256=validate["data_sha256"],
            rows=int(validate["n_pairs"]),
            columns=("id", "prompt", "chosen", "rejected"),
            context="training",
        ),
        DataRef(
            name=f"{name} (eval prompts)",
            path=prompts,
            sha256=validate["prompts_sha256"],
            rows=int(validate["n_eval_prompts"]),
            columns=prompt_columns,
            context="evaluation",
        ),
    ]


def data_name(train: str) -> str:
    """A short name for the training data: a file's or folder's name, a hub name as is."""
    return Path(train).name if ("/" in train and Path(train).exists()) else train


def link_sft_and_dpo(uri: str, sft_run_id: str, dpo_run_id: str) -> None:
    """Tag each run with the other's id and link; list the DPO runs in the SFT run's
    description. An SFT run in another store (outputs copied between work directories)
    is named on the DPO run only, with a warning."""
    c = client(uri)
    sft = registry_lookup(lambda: c.get_run(sft_run_id), "looking up the SFT run", absent=NOT_FOUND)
    if sft is None:
        stage_logger().warning(
            "the SFT run %s is not in this MLflow store, so it is not linked back", sft_run_id
        )
        return
    dpo_link = run_link(uri, dpo_run_id)
    c.set_tag(dpo_run_id, SFT_RUN_LINK, run_link(uri, sft_run_id))
    c.set_tag(sft_run_id, DPO_RUN_PREFIX + dpo_run_id, dpo_link)
    tags = sft.data.tags.items()
    linked = {k[len(DPO_RUN_PREFIX) :]: v for k, v in tags if k.startswith(DPO_RUN_PREFIX)}
    linked = {k: v for k, v in linked.items() if k != dpo_run_id and v.startswith(("#", "http"))}
    linked[dpo_run_id] = dpo_link
    runs = {r: registry_lookup(lambda r=r: c.get_run(r), "looking up a DPO run") for r in linked}
    lines = [
        "Supervised fine-tuning of the reference model (the DPO runs' π_ref).",
        "",
        "DPO runs trained from it:",
        *(f"- [{run.info.run_name}]({linked[r]})" for r, run in runs.items() if run is not None),
    ]
    c.set_tag(sft_run_id, DESCRIPTION, "\n".join(lines))


def set_description(uri: str, run_id: str, text: str) -> None:
    client(uri).set_tag(run_id, DESCRIPTION, text)


def interval(low: float, high: float) -> str:
    """A win rate's 95% interval as every report writes it (run and version descriptions, the
    promotion reason, the Prefect summary)."""
    return f"95% CI {low:.3f}-{high:.3f}"


def evaluation_headline(result: dict, beta: float, loss_type: str, judge: str) -> str:
    """One line a person reads first: the win rate with its interval, reward and KL."""
    return (
        f"β={beta:g}, {loss_type}: win rate {result['win_rate']:.3f} "
        f"({interval(*result['win_rate_ci'])}) against the SFT reference on "
        f"{result['n'] + result.get('unparseable', 0)} held-out prompts (judge {judge}); "
        f"mean reward {result['reward_policy']:.3f} vs {result['reward_reference']:.3f}; "
        f"KL(π‖π_ref) {result['kl']:.3f} nats"
    )


def version_description(tags: dict[str, str]) -> str:
    """A registered version's description, from its tags: what was trained, how it scored,
    and the promotion gate's decision with its whole reason (a tag may be cut short)."""
    low, high = json.loads(tags["win_rate_ci"])
    lines = [
        f"DPO policy, β={tags['beta']}, loss {tags['loss_type']}.",
        "",
        f"Win rate against the SFT reference: {float(tags['win_rate']):.3f} "
        f"({interval(low, high)}), judge {tags['judge']}.",
    ]
    if "promotion.decision" in tags:
        lines += ["", f"Promotion: {tags['promotion.decision']}. Why: {tags['promotion.reason']}."]
    else:
        lines += ["", "Promotion: not decided yet (the promote stage runs the gate)."]
    return "\n".join(lines)


def describe_version(c, name: str, version: str, reason: str | None = None) -> None:
    """Write `version_description` onto the version; `reason`, when given, is the decision's
    reason in full (the tag holds at most what MLflow keeps)."""
    tags = dict(c.get_model_version(name, version).tags)
    if not {"beta", "loss_type", "win_rate", "win_rate_ci", "judge"} <= tags.keys():
        return  # not registered by the pipeline (promoted by hand): nothing to describe from
    if reason is not None:
        tags["promotion.reason"] = reason
    c.update_model_version(name, version, description=version_description(tags))
