"""The MLflow model registry: list versions, look them up, and apply the promotion gate.

Every version gets the alias `candidate` when it is registered (tasks/register.py);
`promote_version` moves `champion` to it only when `models.promotion.decide`
says so, and records the decision and its reason as version tags either way.
"""

from __future__ import annotations

import json
from typing import Any

from flows.errors import ModelError
from models.evaluation import WinRate, judge_answers, win_rate_from_verdicts
from models.promotion import THRESHOLD, Decision, decide
from tasks.tracking import client, require_server

CANDIDATE = "candidate"
CHAMPION = "champion"
# The version tags `dpoflow models` shows, in this order.
FIGURES = ("win_rate", "win_rate_ci", "beta", "loss_type", "judge", "promotion.reason")


def registry(uri: str):
    """An MlflowClient for `uri`, after checking that a tracking server answers."""
    require_server(uri)
    return client(uri)


def get_version(c, name: str, version: str):
    """The registered version, or a ModelError naming what exists."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ModelError(
            f"model '{name}' has no version '{version}' in the registry: "
            "run `dpoflow models` to see the registered names and versions."
        ) from exc


def champion_version(c, name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(c.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def list_versions(c, name: str | None = None) -> list[dict[str, Any]]:
    """Every version (of `name`, or of every model), newest first, with aliases and figures."""
    versions = c.search_model_versions(f"name='{name}'" if name else "")
    if name and not versions:
        raise ModelError(
            f"no registered model named '{name}': run the pipeline first, or run "
            "`dpoflow models` without a name to see what is registered."
        )
    aliases = {}  # search results carry no aliases: the registered model has them
    for model in {v.name for v in versions}:
        for alias, number in c.get_registered_model(model).aliases.items():
            aliases.setdefault((model, str(number)), []).append(alias)
    rows = [
        {
            "name": v.name,
            "version": str(v.version),
            "aliases": sorted(aliases.get((v.name, str(v.version)), [])),
            "run_id": v.run_id,
            **{key: v.tags.get(key, "") for key in FIGURES},
        }
        for v in versions
    ]
    return sorted(rows, key=lambda r: (r["name"], -int(r["version"])))


def load_generator(name: str, version: str) -> tuple[Any, Any]:
    """The (model, tokenizer) of a registered text generator, loaded through MLflow."""
    import mlflow

    generator = mlflow.pyfunc.load_model(f"models:/{name}/{version}").unwrap_python_model()
    return generator.model, generator.tokenizer


def head_to_head(
    name: str, candidate: str, champion: str, prompts: list[str], eval_section: dict
) -> WinRate:
    """Win rate of version `candidate` over version `champion`: both sampled on `prompts`
    with the evaluation settings (independent seeds, as in the evaluation stage) and
    judged by the evaluation's judge."""
    from models.generation import generate
    from models.judges import make_judge

    sampling = {
        key: eval_section[key]
        for key in ("max_new_tokens", "temperature", "top_p", "batch_size", "seed")
    }
    ours = generate(*load_generator(name, candidate), prompts, **sampling)
    theirs = generate(
        *load_generator(name, champion), prompts, **(sampling | {"seed": sampling["seed"] + 1})
    )
    judge = make_judge(eval_section["judge"], eval_section)
    judged = judge_answers(judge, prompts, ours, theirs)
    return win_rate_from_verdicts(judged.verdicts)


def reference_interval(version) -> tuple[float, float]:
    """The version's win-rate interval against its reference, from its `win_rate_ci` tag."""
    raw = version.tags.get("win_rate_ci")
    if not raw:
        raise ModelError(
            f"version {version.version} of '{version.name}' has no win_rate_ci tag, so it was "
            "not registered by the pipeline: promote it with --force if you trust it."
        )
    low, high = json.loads(raw)
    return float(low), float(high)


def promote_version(
    uri: str,
    name: str,
    version: str,
    prompts: list[str],
    eval_section: dict,
    *,
    force: bool = False,
) -> dict[str, Any]:
    """Apply the promotion gate to one version; returns the decision and the aliases after."""
    c = registry(uri)
    candidate = get_version(c, name, version)
    version = str(candidate.version)
    champion = champion_version(c, name)
    h2h: WinRate | None = None
    if force:
        decision = Decision(True, "promoted by hand with --force, without the checks")
    elif champion == version:
        decision = Decision(True, "already the champion")
    else:
        interval = reference_interval(candidate)
        if champion is not None and interval[0] > THRESHOLD:  # else the head-to-head is moot
            h2h = head_to_head(name, version, champion, prompts, eval_section)
        decision = decide(interval, h2h, champion=f"v{champion}" if champion else None)
    tags = {
        "promotion.decision": CHAMPION if decision.promote else CANDIDATE,
        "promotion.reason": decision.reason,
        "promotion.champion_before": champion or "none",
    }
    if h2h is not None:
        tags["promotion.head_to_head"] = f"{h2h.rate:.4f} [{h2h.low:.4f}, {h2h.high:.4f}]"
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)
    if decision.promote:
        c.set_registered_model_alias(name, CHAMPION, version)
    return {
        "name": name,
        "version": version,
        "aliases": sorted(c.get_model_version(name, version).aliases),
        "promoted": decision.promote,
        "reason": decision.reason,
        "champion_before": champion,
    }
