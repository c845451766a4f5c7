"""Stage 7 and `dpoflow promote`: the promotion gate, and the registry moves it makes.

Every version gets the alias `candidate` when it is registered (tasks/register.py);
`promote_version` moves `champion` to it only when `decide` says so, and records the
decision and its reason as version tags either way.

Two checks, both on judged win rates with ties counted as half a win:

1. against the reference (the SFT model), from the evaluation stage;
2. head to head against the current champion, when there is one: both
   policies sampled on the evaluation prompts with the evaluation settings and
   scored by the same judge.

Each check passes only when the lower bound of the Wilson 95% interval is above
0.5, not merely the point estimate. A point estimate above 0.5 is a coin flip
for two equally good models (it happens half the time), so the champion would
change on noise; the lower bound asks for evidence that the candidate is
better, and keeps the champion when the evaluation set is too small to tell.

`decide` is pure, so the rule can be read and tested on its own; below it are the
head-to-head sampling, the registry look-ups and the alias moves, then the stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dpoflow.errors import ModelError
from dpoflow.process_gc import imports_without_collection
from dpoflow.tasks.common import Stage, build_once, dump, stage_logger, stage_task
from dpoflow.tasks.evaluate import read_prompt_rows
from dpoflow.tasks.lineage import describe_version, interval
from dpoflow.tasks.tracking import (
    client,
    registry_lookup,
    require_server,
    server_errors,
    tracking_uri,
)

if TYPE_CHECKING:  # the sampling code (torch, transformers) is imported where it runs
    from dpoflow.models.evaluation import WinRate

# ---------------------------------------------------------------- the rule

THRESHOLD = 0.5


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def _describe(what: str, low: float, high: float, rate: float | None = None) -> str:
    point = f"{rate:.3f} " if rate is not None else ""
    return f"{what} {point}({interval(low, high)})"


def decide(
    reference_interval: tuple[float, float],
    head_to_head: WinRate | None,
    *,
    champion: str | None = None,
    threshold: float = THRESHOLD,
) -> Decision:
    """Promote when the win rate against the reference has its lower bound above
    `threshold` and, if there is a champion, so does the head-to-head win rate."""
    low, high = reference_interval
    vs_reference = _describe("win rate vs reference", low, high)
    if low <= threshold:
        return Decision(False, f"{vs_reference}: lower bound is not above {threshold}")
    if head_to_head is None:
        return Decision(True, f"{vs_reference} and no champion yet")
    h2h = head_to_head
    vs_champion = _describe(
        f"head-to-head win rate vs champion {champion or ''}".rstrip(), h2h.low, h2h.high, h2h.rate
    )
    if h2h.low <= threshold:
        return Decision(False, f"{vs_champion}: lower bound is not above {threshold}")
    return Decision(True, f"{vs_reference}; {vs_champion}")


# ---------------------------------------------------------------- the registry

CANDIDATE = "candidate"
CHAMPION = "champion"
# The champion a promotion replaced: where `--rollback` moves `champion` back to. Each
# champion also keeps its predecessor in the PREDECESSOR tag, so rollbacks can go on.
PREVIOUS_CHAMPION = "previous-champion"
PREDECESSOR = "promotion.previous_champion"
# The version tags `dpoflow models` shows, in this order.
FIGURES = ("win_rate", "win_rate_ci", "beta", "loss_type", "judge", "promotion.reason")


def registry(uri: str):
    """An MlflowClient for `uri`, after checking that a tracking server answers."""
    require_server(uri)
    return client(uri)


def get_version(c, name: str, version: str):
    """The registered version; a ModelError naming what exists when there is no such version,
    a ServerError when the registry fails to answer."""
    found = registry_lookup(
        lambda: c.get_model_version(name, str(version)), f"looking up {name} version {version}"
    )
    if found is None:
        raise ModelError(
            f"model '{name}' has no version '{version}' in the registry: "
            "run `dpoflow models` to see the registered names and versions."
        )
    return found


def alias_version(c, name: str, alias: str) -> str | None:
    """The version `alias` points to; None only when the registry says it is not set."""
    found = registry_lookup(
        lambda: c.get_model_version_by_alias(name, alias), f"looking up the {alias} of {name}"
    )
    return None if found is None else str(found.version)


def champion_version(c, name: str) -> str | None:
    """The version `champion` points to; None only when the registry says it is not set."""
    return alias_version(c, name, CHAMPION)


def registry_state(uri: str, name: str, version: str) -> dict[str, Any]:
    """What the registry says now of `version`: its aliases, the champion, and the reason
    its latest promotion decision recorded. A cached run reports this, not what was true when
    its promote stage ran: other runs may have moved the aliases since."""
    c = registry(uri)
    found = get_version(c, name, version)
    return {
        "aliases": sorted(found.aliases),
        "champion": champion_version(c, name),
        "promotion_reason": found.tags.get("promotion.reason", ""),
    }


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
    """The (model, tokenizer) of a registered text generator.

    Only its weights folder is downloaded and loaded with transformers: loading the pyfunc
    would run the Python file stored with the version, and anyone who can write to the
    registry could put code there.
    """
    import tempfile

    with imports_without_collection():  # torch and transformers, the first time: process_gc
        from dpoflow.models.generation import load_causal_lm
        from dpoflow.models.serving import download_model_dir

    # The weights are in memory once loaded, so the download need not outlive this call.
    with tempfile.TemporaryDirectory() as tmp:
        return load_causal_lm(str(download_model_dir(f"models:/{name}/{version}", tmp)))


def head_to_head(
    name: str, candidate: str, champion: str, prompts: list[str], eval_section: dict
) -> WinRate:
    """Win rate of version `candidate` over version `champion`: both sampled on `prompts`
    with the evaluation settings (independent seeds, as in the evaluation stage) and
    judged by the evaluation's judge."""
    with imports_without_collection():  # torch and transformers, the first time: process_gc
        from dpoflow.models.evaluation import judge_answers, win_rate_from_verdicts
        from dpoflow.models.generation import generate
        from dpoflow.models.judges import make_judge

    sampling = {
        key: eval_section[key]
        for key in ("max_new_tokens", "temperature", "top_p", "batch_size", "seed")
    }
    log = stage_logger().info  # generation's progress lines
    ours = generate(*load_generator(name, candidate), prompts, **sampling, log=log)
    theirs = generate(
        *load_generator(name, champion),
        prompts,
        **(sampling | {"seed": sampling["seed"] + 1}),
        log=log,
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
    describe_version(c, name, version, decision.reason)
    if decision.promote and champion != version:
        move_champion(c, name, version, previous=champion)
    return {
        "name": name,
        "version": version,
        "aliases": sorted(c.get_model_version(name, version).aliases),
        "promoted": decision.promote,
        "reason": decision.reason,
        "champion_before": champion,
    }


def move_champion(c, name: str, version: str, *, previous: str | None) -> None:
    """Make `version` the champion, remembering the one it replaces for `--rollback`."""
    if previous is not None:
        c.set_model_version_tag(name, version, PREDECESSOR, previous)
        c.set_registered_model_alias(name, PREVIOUS_CHAMPION, previous)
    c.set_registered_model_alias(name, CHAMPION, version)


def rollback(uri: str, name: str) -> dict[str, Any]:
    """Move `champion` back to `previous-champion`; that alias then moves to the predecessor of
    the restored version (its PREDECESSOR tag), or goes when it had none."""
    c = registry(uri)
    current = champion_version(c, name)
    found = registry_lookup(
        lambda: c.get_model_version_by_alias(name, PREVIOUS_CHAMPION),
        f"looking up the previous champion of {name}",
    )
    if current is None or found is None:
        raise ModelError(
            f"model '{name}' has no {'champion' if current is None else PREVIOUS_CHAMPION} "
            "to roll back from: promote a version with `dpoflow promote NAME VERSION` instead."
        )
    restored = str(found.version)
    earlier = found.tags.get(PREDECESSOR)
    c.set_model_version_tag(
        name, current, "promotion.reason", f"was champion; rolled back to v{restored} by hand"
    )
    c.set_registered_model_alias(name, CHAMPION, restored)
    if earlier and earlier != restored:
        c.set_registered_model_alias(name, PREVIOUS_CHAMPION, earlier)
    else:
        c.delete_registered_model_alias(name, PREVIOUS_CHAMPION)
    return {
        "name": name,
        "version": restored,
        "rolled_back_from": current,
        "previous_champion": earlier if earlier and earlier != restored else None,
        "aliases": sorted(c.get_model_version(name, restored).aliases),
    }


def gate_prompts(eval_prompts_file: Path, limit: int) -> list[str]:
    """The prompts of the head-to-head: the validated evaluation prompts, as evaluated."""
    return [row["prompt"] for row in read_prompt_rows(eval_prompts_file, limit)]


# ---------------------------------------------------------------- the stage


@stage_task("promote")
def promote(key: str, workdir: str, section: dict, upstream: dict) -> dict:
    logger = stage_logger()
    registered = upstream["register"]

    def build(partial: Path) -> dict:
        ev = section["eval"]
        prompts = gate_prompts(
            Path(upstream["validate"]["path"]) / "eval_prompts.jsonl", ev["num_prompts"]
        )
        uri = tracking_uri(section["mlflow"]["tracking_uri"], workdir)
        with server_errors(uri, "applying the promotion gate"):
            outcome = promote_version(uri, registered["name"], registered["version"], prompts, ev)
        logger.info(
            "%s v%s %s: %s",
            outcome["name"],
            outcome["version"],
            "promoted to champion" if outcome["promoted"] else "stays candidate",
            outcome["reason"],
        )
        return outcome

    return build_once("promote", key, workdir, section, upstream, build)


STAGE = Stage(
    name="promote",
    task=promote,
    # The head-to-head samples and judges with the evaluation's settings.
    reads=lambda cfg, _: {"eval": dump(cfg.eval), "mlflow": dump(cfg.mlflow)},
    inputs={"version": "register.registered", "prompts": "validate.prompts_sha256"},
)
