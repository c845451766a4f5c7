"""How far DPO has moved the policy from its reference, measured while it trains.

The evaluation stage's `eval/kl` is KL(policy || reference) from the finished policy's own
samples: one number, after training. This probe gives a curve, every `eval_every` steps,
at the cost of one forward pass over a fixed set of answers:

    KL(reference || policy) = E_{y ~ reference}[log reference(y|x) - log policy(y|x)]

At step 0 the policy *is* the reference (DPO starts from the SFT model), so answers sampled
from it then are the reference's own samples, and their log-probs then are the reference's.
They are kept (`reference_samples.json` beside metrics.jsonl, so a resumed job goes on with
the same ones); at each held-out evaluation the current policy scores them, and the mean
difference is an unbiased estimate of the KL in nats per answer. No reference model stays in
memory. The held-out data's own answers would not do: the reference was not their source, and
log reference - log policy on them goes negative as soon as the policy fits them better.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from dpoflow.models.generation import sample
from dpoflow.models.logprobs import collate, sequence_logps

SAMPLES_FILE = "reference_samples.json"


def sample_answers(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int, seed: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, answer_ids) of one answer per prompt, sampled at temperature 1 (the
    model's own distribution, so the estimate is of the KL itself)."""
    drawn = sample(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        batch_size=batch_size,
        seed=seed,
    )
    return [(s.prompt_ids, s.answer_ids) for s in drawn]


@torch.no_grad()
def answer_logps(
    model, answers: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
) -> list[float]:
    """Summed log-probs of each answer under `model` (every rank runs every batch: under
    ZeRO-3 each forward pass needs all of them)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(answers), batch_size):
        batch = collate(answers[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out += sequence_logps(model, batch)["logps"].float().tolist()
    model.train(was_training)
    return out


@dataclass(frozen=True)
class DriftProbe:
    """The reference's answers and its log-probs of them, recorded at step 0."""

    answers: list[tuple[list[int], list[int]]]
    reference_logps: list[float]

    @classmethod
    def record(
        cls, model, answers: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int
    ) -> DriftProbe:
        """Score `answers` with `model` while it is still the reference (before step 1)."""
        return cls(answers, answer_logps(model, answers, pad_id, batch_size))

    def kl(self, model, pad_id: int, batch_size: int) -> float:
        """KL(reference || model) in nats per answer, over the recorded answers."""
        now = answer_logps(model, self.answers, pad_id, batch_size)
        diffs = [ref - cur for ref, cur in zip(self.reference_logps, now, strict=True)]
        return sum(diffs) / len(diffs)

    def save(self, path: Path) -> None:
        record = {"answers": self.answers, "reference_logps": self.reference_logps}
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> DriftProbe | None:
        """The probe an earlier attempt recorded, or None when there is none to go on with."""
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        answers = [(list(p), list(a)) for p, a in record["answers"]]
        return cls(answers, [float(x) for x in record["reference_logps"]])
