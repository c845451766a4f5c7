"""Judge a trained policy against its reference: win rate, rewards, and KL drift.

DPO trades reward against divergence from the reference, so an evaluation
reports both: how often the judge prefers the policy's answer to the
reference's answer for the same prompt (with an interval, since eval sets are
small), and how far the policy has moved from the reference (sampled KL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.generation import generate, load_causal_lm
from models.judges import Judge
from models.logprobs import collate, sequence_logps, tokenize_example

# Judge scores closer than this are a tie: float noise must not decide a comparison.
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class WinRate:
    """Pairwise win rate of policy over reference, ties counted as half a win.

    `low` and `high` bound `rate` with a Wilson score interval.
    """

    rate: float
    low: float
    high: float
    wins: int
    ties: int
    losses: int
    n: int


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
    wins, ties, losses = (verdicts.count(v) for v in ("win", "tie", "loss"))
    n = len(verdicts)
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n, z=z)
    return WinRate(rate=rate, low=low, high=high, wins=wins, ties=ties, losses=losses, n=n)


def estimate_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    answers: list[str],
    *,
    max_length: int = 256,
    max_prompt_length: int = 128,
    batch_size: int = 32,
) -> tuple[float, float]:
    """Monte-Carlo KL(policy || reference) from answers the POLICY sampled.

    Per sample, log pi(y|x) - log pi_ref(y|x), summed over the answer tokens
    (eos included, as in training); the mean of these is an unbiased estimate of
    the sequence-level KL when y ~ pi. Returns (mean, standard error of the mean);
    the standard error is NaN for a single sample. Answers are re-tokenized from
    text, so the estimate is exact only where decoding then encoding round-trips.
    """
    if len(prompts) != len(answers):
        raise ValueError(f"got {len(prompts)} prompts but {len(answers)} answers")
    if not prompts:
        raise ValueError("estimate_kl needs at least one (prompt, answer) pair")
    examples = [
        tokenize_example(
            tokenizer, prompt, answer, max_length=max_length, max_prompt_length=max_prompt_length
        )
        for prompt, answer in zip(prompts, answers, strict=True)
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    differences: list[torch.Tensor] = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        policy_logps = _answer_logps(policy, batch)
        reference_logps = _answer_logps(reference, batch)
        differences.append(policy_logps - reference_logps)
    return _mean_and_stderr(torch.cat(differences))


def _answer_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed answer-token log-probs [N], in float64 on the CPU for the subtraction."""
    device = next(model.parameters()).device
    on_device = {key: value.to(device) for key, value in batch.items()}
    with torch.inference_mode():
        return sequence_logps(model, on_device)["logps"].double().cpu()


def _mean_and_stderr(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = values.mean().item()
    stderr = (values.std(correction=1) / math.sqrt(n)).item() if n > 1 else float("nan")
    return mean, stderr


def evaluate_policy(
    policy_dir: str,
    reference_dir: str,
    prompts: list[str],
    judge: Judge,
    *,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
) -> dict:
    """Sample from policy and reference under identical settings, judge both, and
    report the win rate (Wilson 95% interval), mean judge rewards and the sampled KL.

    The two models draw independent samples (the reference's seed is `seed + 1`):
    with shared random numbers two similar models would often write the very same
    answer, and those forced ties would pull every win rate towards 0.5. The KL
    uses the policy's tokenizer for both models, as DPO policies share their
    reference's tokenizer.
    """
    if not prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    sampling = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "batch_size": batch_size,
        "seed": seed,
    }
    policy, tokenizer = load_causal_lm(policy_dir)
    reference, reference_tokenizer = load_causal_lm(reference_dir)
    policy_answers = generate(policy, tokenizer, prompts, **sampling)
    reference_answers = generate(
        reference, reference_tokenizer, prompts, **(sampling | {"seed": seed + 1})
    )

    policy_scores = judge.score(prompts, policy_answers)
    reference_scores = judge.score(prompts, reference_answers)
    result = win_rate(policy_scores, reference_scores)
    kl, kl_stderr = estimate_kl(policy, reference, tokenizer, prompts, policy_answers)

    samples = [
        {
            "prompt": prompt,
            "policy_answer": policy_answer,
            "reference_answer": reference_answer,
            "policy_score": float(policy_score),
            "reference_score": float(reference_score),
            "verdict": verdict(policy_score, reference_score),
        }
        for prompt, policy_answer, reference_answer, policy_score, reference_score in zip(
            prompts, policy_answers, reference_answers, policy_scores, reference_scores, strict=True
        )
    ]
    return {
        "win_rate": result.rate,
        "win_rate_ci": [result.low, result.high],
        "wins": result.wins,
        "ties": result.ties,
        "losses": result.losses,
        "n": result.n,
        "reward_policy": _mean(policy_scores),
        "reward_reference": _mean(reference_scores),
        "kl": kl,
        "kl_stderr": kl_stderr,
        "samples": samples,
    }


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values))


def markdown_report(result: dict, *, title: str, max_samples: int = 5) -> str:
    """A short markdown summary of `evaluate_policy`'s result, for a Prefect artifact."""
    low, high = result["win_rate_ci"]
    lines = [
        f"# {title}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| win rate (ties = 1/2) | {result['win_rate']:.3f} (95% CI {low:.3f} to {high:.3f}) |",
        f"| wins / ties / losses | {result['wins']} / {result['ties']} / {result['losses']} "
        f"(n = {result['n']}) |",
        f"| mean reward, policy | {result['reward_policy']:.4f} |",
        f"| mean reward, reference | {result['reward_reference']:.4f} |",
        f"| KL(policy ‖ reference), nats | {result['kl']:.4f} ± {result['kl_stderr']:.4f} |",
    ]
    samples = result.get("samples", [])[:max_samples]
    if samples:
        lines += [
            "",
            f"## Samples (first {len(samples)})",
            "",
            "| prompt | policy | reference | verdict |",
            "| --- | --- | --- | --- |",
        ]
        lines += [
            f"| {_cell(s['prompt'])} | {_cell(s['policy_answer'])} ({s['policy_score']:.3f}) "
            f"| {_cell(s['reference_answer'])} ({s['reference_score']:.3f}) | {s['verdict']} |"
            for s in samples
        ]
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 120) -> str:
    """Text made safe for one markdown table cell: one line, no pipes, bounded length."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
