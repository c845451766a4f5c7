"""The evaluation's result as markdown, for the Prefect artifacts of the evaluate stage and of a
run's view. Formatting only: it imports nothing heavy, so a run whose evaluation is cached
publishes its report without loading torch."""

from __future__ import annotations


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
    if result.get("unparseable"):
        lines.append(f"| unparseable judge verdicts (left out) | {result['unparseable']} |")
    versus = result.get("vs_chosen")
    if versus:
        low_c, high_c = versus["win_rate_ci"]
        lines.append(
            f"| win rate vs dataset's chosen | {versus['win_rate']:.3f} "
            f"(95% CI {low_c:.3f} to {high_c:.3f}, n = {versus['n']}) |"
        )
    for key, figures in result.get("by_temperature", {}).items():
        low_t, high_t = figures["win_rate_ci"]
        lines.append(
            f"| win rate at temperature {key} | {figures['win_rate']:.3f} "
            f"(95% CI {low_t:.3f} to {high_t:.3f}), KL {figures['kl']:.4f} |"
        )
    samples = result.get("samples", [])[:max_samples]
    if samples:
        lines += [
            "",
            f"## Samples (first {len(samples)})",
            "",
            # The short columns first: long answers wrap at the end instead of pushing the
            # verdict off the page.
            "| verdict | policy score | reference score | prompt | policy | reference |",
            "| --- | ---: | ---: | --- | --- | --- |",
        ]
        lines += [
            f"| {s['verdict']} | {s['policy_score']:.3f} | {s['reference_score']:.3f} "
            f"| {_cell(s['prompt'])} | {_cell(s['policy_answer'])} "
            f"| {_cell(s['reference_answer'])} |"
            for s in samples
        ]
    return "\n".join(lines) + "\n"


def _cell(text: str, limit: int = 120) -> str:
    """Text made safe for one markdown table cell: one line, no pipes, bounded length."""
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"
