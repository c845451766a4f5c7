"""Judge a trained policy against its reference: win rate, rewards, and KL drift.

DPO trades reward against divergence from the reference, so an evaluation
reports both: how often the judge prefers the policy's answer to the
reference's answer for the same prompt (with an interval, since eval sets are
small), and how far the policy has moved from the reference (sampled KL).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dpoflow.models.generation import Sample, answer_texts, generate, load_causal_lm, sample
from dpoflow.models.judge_protocol import Judge, PairwiseJudge, Verdict
from dpoflow.models.logprobs import collate, sequence_logps
from dpoflow.models.progress import Progress

# Judge scores closer than this are a tie: float noise must not decide a comparison.
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class WinRate:
    """Pairwise win rate of policy over reference, ties counted as half a win.

    `low` and `high` bound `rate` with a Wilson score interval. `n` counts the judged
    comparisons; `unparseable` ones (a pairwise judge gave no verdict) are left out of it.
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int
    unparseable: int = 0


def verdict(policy_score: float, reference_score: float) -> str:
    """The policy's verdict, "win", "tie" or "loss", with `TIE_TOLERANCE` deciding ties."""
    if abs(policy_score - reference_score) <= TIE_TOLERANCE:
        return "tie"
    return "win" if policy_score > reference_score else "loss"


def wilson_interval(rate: float, n: int, *, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion; unlike the normal one it stays inside [0, 1]
    and is sensible for rates near 0 or 1 and for small n."""
    if n <= 0:
        raise ValueError("a Wilson interval needs at least one comparison")
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (rate + z2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


def win_rate(
    policy_scores: list[float], reference_scores: list[float], *, z: float = 1.96
) -> WinRate:
    """Compare paired judge scores: a win is policy > reference.

    Ties count as half a win, `rate = (wins + 0.5 * ties) / n`, and the
    Wilson interval (z=1.96: 95%) is computed on that rate with n = number of
    comparisons. This treats a tie as a coin flip, which keeps the rate at 0.5
    for two identical models instead of dropping ties and shrinking n.
    """
    if len(policy_scores) != len(reference_scores):
        raise ValueError(
            f"got {len(policy_scores)} policy scores but {len(reference_scores)} "
            "reference scores; they must pair up"
        )
    if not policy_scores:
        raise ValueError("win_rate needs at least one comparison")
    verdicts = [verdict(p, r) for p, r in zip(policy_scores, reference_scores, strict=True)]
    return win_rate_from_verdicts(verdicts, z=z)


def win_rate_from_verdicts(verdicts: list[Verdict], *, z: float = 1.96) -> WinRate:
    """The win rate of verdicts ("win", "tie", "loss"), ties half, with a Wilson interval.

    "unparseable" verdicts are counted but left out of n: guessing them would bias the
    rate, and silently dropping them would hide a judge that cannot follow its prompt.
    """
    wins, ties, losses, unparseable = (
        verdicts.count(v) for v in ("win", "tie", "loss", "unparseable")
    )
    n = wins + ties + losses
    if n == 0:
        raise ValueError(
            f"no comparison could be judged ({unparseable} unparseable verdicts); "
            "check the judge's replies"
        )
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n, z=z)
    return WinRate(
        rate=rate,
        low=low,
        high=high,
        wins=wins,
        ties=ties,
        losses=losses,
        n=n,
        unparseable=unparseable,
    )


def estimate_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    samples: list[Sample],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> tuple[float, float]:
    """Monte-Carlo KL(policy || reference) from answers the POLICY sampled.

    Per sample, log pi(y|x) - log pi_ref(y|x), summed over the tokens the policy
    sampled (its eos included when it stopped by itself); the mean of these is an
    unbiased estimate of the sequence-level KL when y ~ pi (temperature 1, top_p 1).
    Returns (mean, standard error of the mean); the standard error is NaN for a
    single sample.
    """
    return _mean_and_stderr(
        kl_terms(policy, reference, samples, pad_id=pad_id, batch_size=batch_size)
    )


def kl_terms(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    samples: list[Sample],
    *,
    pad_id: int,
    batch_size: int = 32,
) -> list[float]:
    """Per sample, log pi(y|x) - log pi_ref(y|x): the terms `estimate_kl` averages.

    The sampled token ids are scored as they were sampled: decoding them to text and
    encoding that again can give other tokens (a BPE merge across the answer's start, a
    special token dropped), which neither model wrote and both may find unlikely."""
    if not samples:
        raise ValueError("estimate_kl needs at least one sample")
    examples = [(s.prompt_ids, s.answer_ids) for s in samples]
    differences: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        policy_logps = _answer_logps(policy, batch)
        reference_logps = _answer_logps(reference, batch)
        differences += (policy_logps - reference_logps).tolist()
    return differences


def _answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed answer-token log-probs [N], in float64 on the CPU for the subtraction."""
    device = next(model.parameters()).device
    on_device = {key: value.to(device) for key, value in batch.items()}
    with torch.inference_mode():
        return sequence_logps(model, on_device)["logps"].double().cpu()


def _mean_and_stderr(terms: list[float]) -> tuple[float, float]:
    values = torch.tensor(terms, dtype=torch.float64)
    n = values.numel()
    mean = values.mean().item()
    stderr = (values.std(correction=1) / math.sqrt(n)).item() if n > 1 else float("nan")
    return mean, stderr


@dataclass(frozen=True)
class Judged:
    """Verdicts of the policy's answers against other answers, and the scores behind them
    (None for a pairwise judge, which gives verdicts only)."""

    verdicts: list[Verdict]
    policy_scores: list[float] | None
    other_scores: list[float] | None


def judge_answers(
    judge: Judge | PairwiseJudge,
    prompts: list[str],
    policy_answers: list[str],
    other_answers: list[str],
) -> Judged:
    """Judge the policy's answers against others: pairwise judges compare, pointwise ones
    score both sides and the scores decide."""
    if isinstance(judge, PairwiseJudge):
        return Judged(judge.compare(prompts, policy_answers, other_answers), None, None)
    policy_scores = judge.score(prompts, policy_answers)
    other_scores = judge.score(prompts, other_answers)
    verdicts = [verdict(p, o) for p, o in zip(policy_scores, other_scores, strict=True)]
    return Judged(verdicts, policy_scores, other_scores)


def evaluate_policy(
    policy_dir: str,
    reference_dir: str,
    prompts: list[str],
    judge: Judge | PairwiseJudge,
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    temperatures: list[float] | None = None,
    chosen: list[str | None] | None = None,
    progress: JudgedLog | None = None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Sample from policy and reference under identical settings, judge both, and
    report the win rate (Wilson 95% interval), mean judge rewards and the sampled KL.

    The two models draw independent samples (the reference's seed is `seed + 1`):
    with shared random numbers two similar models would often write the very same
    answer, and those forced ties would pull every win rate towards 0.5. The KL
    uses the policy's tokenizer for both models, as DPO policies share their
    reference's tokenizer. A pairwise judge has no rewards: they are NaN.

    `temperatures` adds the same figures at each listed temperature under
    `by_temperature` (the top-level figures stay those at `temperature`); the KL
    there is the mean log-ratio under that temperature's samples, a KL proper only
    at 1. `chosen` (the dataset's chosen answer per prompt, None where missing) adds
    the policy's win rate against those answers under `vs_chosen`.

    Prompts go through in chunks of `batch_size`, each generated, judged and recorded
    in `progress` before the next: an evaluation killed half-way and run again with
    the same log judges only the chunks it had not finished, with the same answers
    (each chunk's samples depend on its index only). `log` gets progress lines (`Progress`).
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    judged = progress if progress is not None else JudgedLog(None)
    policy, tokenizer = load_causal_lm(policy_dir)
    reference, reference_tokenizer = load_causal_lm(reference_dir)
    pad_id = tokenizer.pad_token_id  # load_causal_lm sets one

    def judge_chunk(temp: float, index: int, start: int) -> dict:
        rows = slice(start, start + batch_size)
        chunk = prompts[rows]
        sampling = {
            "max_new_tokens": max_new_tokens,
            "temperature": temp,
            "top_p": top_p,
            "batch_size": batch_size,
            "first_batch": index,
        }
        policy_samples = sample(policy, tokenizer, chunk, seed=seed, **sampling)
        policy_answers = answer_texts(tokenizer, policy_samples)
        reference_answers = generate(
            reference, reference_tokenizer, chunk, seed=seed + 1, **sampling
        )
        comparison = judge_answers(judge, chunk, policy_answers, reference_answers)
        record = {
            "policy_answers": policy_answers,
            "reference_answers": reference_answers,
            "verdicts": comparison.verdicts,
            "policy_scores": comparison.policy_scores,
            "other_scores": comparison.other_scores,
            "kl_terms": kl_terms(policy, reference, policy_samples, pad_id=pad_id),
        }
        if chosen is not None and temp == temperature:
            record["vs_chosen"] = _verdicts_against_chosen(
                judge, chunk, policy_answers, chosen[rows]
            )
        return record

    def at(temp: float) -> tuple[dict, list[dict], list[dict]]:
        name = temperature_key(temp)
        starts = list(enumerate(range(0, len(prompts), batch_size)))
        done = sum(len(r["verdicts"]) for i, _ in starts if (r := judged.get(name, i)))
        progress = Progress(
            f"evaluation at temperature {temp:g}",
            len(prompts),
            "prompts",
            log or (lambda line: None),
            already=done,
        )
        records = []
        for index, start in starts:
            record = judged.get(name, index)
            if record is None:
                record = judged.add(name, index, judge_chunk(temp, index, start))
                done += len(record["verdicts"])
                progress.update(done)
            records.append(record)
        merged = _merge(records)
        comparison = Judged(merged["verdicts"], merged["policy_scores"], merged["other_scores"])
        kl = _mean_and_stderr(merged["kl_terms"])
        samples = _samples(
            prompts, merged["policy_answers"], merged["reference_answers"], comparison
        )
        return _figures(comparison, kl), samples, records

    figures, samples, records = at(temperature)
    result = {**figures, "samples": samples}
    if temperatures:
        result["by_temperature"] = {
            temperature_key(t): figures if t == temperature else at(t)[0]
            for t in dict.fromkeys(temperatures)
        }
    if chosen is not None:
        against_chosen = [v for r in records for v in r["vs_chosen"] if v is not None]
        result["vs_chosen"] = _win_rate_figures(against_chosen) if against_chosen else None
    return result


class JudgedLog:
    """The judged chunks of an evaluation, one JSON line each, so a killed one resumes.

    A line is appended (and flushed to disk) once its chunk is generated and judged. A
    last line cut short by a kill is dropped on loading, and that chunk is judged again.
    With `path=None` nothing is kept: the log only hands records back.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.records: dict[tuple[str, int], dict] = {}
        self.resumed_prompts = 0  # prompts judged before this log was opened
        if path is None or not path.exists():
            return
        text = path.read_text(encoding="utf-8")
        complete = text[: text.rfind("\n") + 1]  # drop a line cut short by a kill
        if complete != text:
            path.write_text(complete, encoding="utf-8")
        for line in complete.splitlines():
            record = json.loads(line)
            self.records[(record["temperature"], record["chunk"])] = record
            self.resumed_prompts += len(record["verdicts"])

    def get(self, temperature: str, chunk: int) -> dict | None:
        return self.records.get((temperature, chunk))

    def add(self, temperature: str, chunk: int, record: dict) -> dict:
        record = {"temperature": temperature, "chunk": chunk, **record}
        self.records[(temperature, chunk)] = record
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return record


def _merge(records: list[dict]) -> dict:
    """Chunk records joined into one list per field (scores stay None for pairwise judges)."""
    merged: dict = {}
    for key in ("policy_answers", "reference_answers", "verdicts", "kl_terms"):
        merged[key] = [item for r in records for item in r[key]]
    for key in ("policy_scores", "other_scores"):
        parts = [r[key] for r in records]
        merged[key] = None if any(p is None for p in parts) else [x for p in parts for x in p]
    return merged


def temperature_key(temperature: float) -> str:
    """How a temperature names its metrics: 0.7 -> "0.7", 1.0 -> "1"."""
    return f"{temperature:g}"


def _figures(comparison: Judged, kl: tuple[float, float]) -> dict:
    return {
        **_win_rate_figures(comparison.verdicts),
        "reward_policy": _mean(comparison.policy_scores),
        "reward_reference": _mean(comparison.other_scores),
        "kl": kl[0],
        "kl_stderr": kl[1],
    }


def _samples(
    prompts: list[str], policy_answers: list[str], reference_answers: list[str], c: Judged
) -> list[dict]:
    nan = [math.nan] * len(prompts)
    return [
        {
            "prompt": prompt,
            "policy_answer": policy_answer,
            "reference_answer": reference_answer,
            "policy_score": float(policy_score),
            "reference_score": float(reference_score),
            "verdict": v,
        }
        for prompt, policy_answer, reference_answer, policy_score, reference_score, v in zip(
            prompts,
            policy_answers,
            reference_answers,
            c.policy_scores or nan,
            c.other_scores or nan,
            c.verdicts,
            strict=True,
        )
    ]


def _verdicts_against_chosen(
    judge: Judge | PairwiseJudge,
    prompts: list[str],
    policy_answers: list[str],
    chosen: list[str | None],
) -> list[Verdict | None]:
    """The policy's verdict against the dataset's chosen answer, None where there is none."""
    rows = [i for i, best in enumerate(chosen) if best is not None]
    verdicts: list[Verdict | None] = [None] * len(prompts)
    if rows:
        judged = judge_answers(
            judge,
            [prompts[i] for i in rows],
            [policy_answers[i] for i in rows],
            [chosen[i] for i in rows],
        )
        for i, v in zip(rows, judged.verdicts, strict=True):
            verdicts[i] = v
    return verdicts


def _win_rate_figures(verdicts: list[Verdict]) -> dict:
    result = win_rate_from_verdicts(verdicts)
    return {
        "win_rate": result.rate,
        "win_rate_ci": [result.low, result.high],
        "wins": result.wins,
        "ties": result.ties,
        "losses": result.losses,
        "n": result.n,
        "unparseable": result.unparseable,
    }


def _mean(values: list[float] | None) -> float:
    """Mean judge reward; NaN when the judge gives verdicts but no scores."""
    return float(sum(values) / len(values)) if values else math.nan
