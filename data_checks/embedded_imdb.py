"""The embedded default data set: synthetic movie reviews in the shape of the DPO paper's IMDb run.

In the paper, prompts are openings of IMDb reviews and the "true" reward is a sentiment
classifier. Shipping IMDb is not an option (size, licence, no network), so this module
*generates* a small stand-in from a grammar:

* prompts are sentiment-neutral review openings ("The acting in this film was"),
* answers are short continuations whose sentiment comes from local word choice
  ("truly wonderful, and the music was great."), spread over five sentiment levels,
* pairs are labelled by the same judge the evaluation uses (VADER), so "chosen" really
  is the more positive answer.

Because sentiment lives in a few hundred words, a tiny model can learn it after SFT on
all answers, and DPO on the pairs measurably moves its samples towards the positive side.

Everything is driven by one ``random.Random(seed)`` over lists (never sets or dict hashing),
so the files are byte-identical for the same arguments in any process.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
from collections.abc import Iterable

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

#: Pairs whose chosen/rejected VADER scores differ less than this are resampled.
MIN_MARGIN = 0.3

MIN_ANSWER_WORDS = 6
MAX_ANSWER_WORDS = 20
MIN_PROMPT_WORDS = 2
MAX_PROMPT_WORDS = 8

# --------------------------------------------------------------------------- prompt parts
# Every word here is absent from VADER's lexicon, so prompts score 0 (checked at build time).
# The word tables below are laid out by hand; keep the formatter off them.
# fmt: off

MEDIA = ["movie", "film", "picture"]
ASPECTS = [
    "acting", "plot", "story", "script", "dialogue", "music", "soundtrack", "cast",
    "direction", "cinematography", "pacing", "ending", "editing", "camera work", "costumes",
]
LEADS = ["", "Overall,", "For me,", "In short,", "Looking back,", "To me,", "In the end,"]
COPULAS = ["was", "is", "felt", "seemed", "turned out to be"]
PLAIN_SUBJECTS = [
    "the whole thing", "the first hour", "the second half", "the last scene",
    "the opening scene", "the main character", "the lead actor", "the sequel", "the remake",
]
VIEWERS = ["I", "We", "My wife", "My husband", "My brother and I", "My dad", "My mom"]
VIEW_VERBS = ["watched", "saw", "rented", "streamed", "caught"]
WHEN = [
    "", "last night", "on Friday", "yesterday", "last weekend", "at the cinema",
    "on television", "on a plane", "twice", "with my brother",
]

# --------------------------------------------------------------------------- answer parts
# Sentiment levels: 2 strong positive, 1 mild positive, 0 neutral, -1 mild negative,
# -2 strong negative. Each level has its own words so sentiment is a local, learnable cue.

# Neutral answers are drawn half as often: they never beat each other by the margin, and
# the SFT mix should be close to half negative so DPO has something to move.
LEVELS = [2, 2, 1, 1, 0, -1, -1, -2, -2]

ADJECTIVES: dict[int, list[str]] = {
    2: ["wonderful", "brilliant", "excellent", "superb", "fantastic", "amazing", "beautiful",
        "delightful", "outstanding", "perfect", "great", "lovely", "magnificent"],
    1: ["good", "nice", "pleasant", "enjoyable", "fun", "charming", "sweet", "funny", "clever",
        "entertaining"],
    0: ["ordinary", "average", "long", "short", "quiet", "simple", "typical", "familiar",
        "predictable", "standard", "slow", "plain"],
    -1: ["dull", "weak", "messy", "boring", "confusing", "lame", "annoying", "disappointing"],
    -2: ["terrible", "awful", "horrible", "dreadful", "stupid", "painful", "pathetic", "bad",
         "poor", "ugly"],
}
INTENSIFIERS: dict[int, list[str]] = {
    2: ["", "truly", "really", "absolutely", "so", "very", "incredibly"],
    1: ["", "fairly", "mostly", "kind of", "somewhat", "rather"],
    0: ["", "fairly", "mostly", "rather"],
    -1: ["", "fairly", "mostly", "kind of", "somewhat", "rather"],
    -2: ["", "truly", "really", "absolutely", "so", "very", "incredibly"],
}
NOUN_PHRASES: dict[int, list[str]] = {
    2: ["a masterpiece", "a real delight", "a great ride", "a wonderful surprise"],
    1: ["a nice surprise", "a good time", "a fun evening", "a pleasant watch"],
    0: ["a typical drama", "an ordinary story", "a long evening", "a standard thriller"],
    -1: ["a weak effort", "a dull evening", "a bit of a mess", "a disappointing watch"],
    -2: ["a disaster", "a total mess", "a waste of time", "the worst film of the year"],
}
VERB_PHRASES: dict[int, list[str]] = {
    2: ["loved every minute of it", "adored the whole thing", "would happily watch it again",
        "smiled all the way through", "loved the {aspect}"],
    1: ["liked it", "enjoyed most of it", "liked the {aspect}", "enjoyed the {aspect}",
        "would recommend it"],
    0: ["watched it on a Sunday", "saw it once", "watched it with my brother",
        "checked my watch once", "read the book first", "noticed the {aspect}"],
    -1: ["was bored at times", "was a little disappointed", "disliked the {aspect}",
         "got bored halfway through", "found the {aspect} annoying"],
    -2: ["hated every minute of it", "regret watching it", "wasted two hours on it",
         "left the theater angry", "hated the {aspect}"],
}
FINISHERS = ["from start to finish", "from beginning to end", "all the way through",
             "in every scene"]
# fmt: on


def _prompt_space() -> list[tuple[str, str]]:
    """All prompts as ``(family, text)``, in a fixed order; the family decides the answer head.

    Three families cover three grammatical positions a review opening can stop at:
    after a copula ("... was"), after a clause ("... and") and after a determiner
    ("... in this"). Thousands of distinct prompts keep the eval split genuinely unseen.
    """
    prompts: list[tuple[str, str]] = []
    subjects = [f"this {m}" for m in MEDIA] + [f"the {m}" for m in MEDIA] + PLAIN_SUBJECTS
    subjects += [f"the {a} {p} this {m}" for a in ASPECTS for p in ("in", "of") for m in MEDIA]
    for lead in LEADS:
        for subject in subjects:
            for copula in COPULAS:
                prompts.append(("copula", _join(lead, subject, copula)))
        for aspect in ASPECTS:
            for prep in ("in", "of"):
                prompts.append(("noun", _join(lead, f"the {aspect} {prep} this")))
    for viewer in VIEWERS:
        for verb in VIEW_VERBS:
            for medium in [f"this {m}" for m in MEDIA] + ["it"]:
                for when in WHEN:
                    prompts.append(("clause", _join(viewer, verb, medium, when, "and")))
    unique = list(dict.fromkeys(prompts))
    return [p for p in unique if MIN_PROMPT_WORDS <= len(p[1].split()) <= MAX_PROMPT_WORDS]


def _join(*parts: str) -> str:
    text = " ".join(p for p in parts if p)
    return text[0].upper() + text[1:]


def _adjective_phrase(rng: random.Random, level: int) -> str:
    intensifier = rng.choice(INTENSIFIERS[level])
    adjective = rng.choice(ADJECTIVES[level])
    return f"{intensifier} {adjective}" if intensifier else adjective


def _verb_phrase(rng: random.Random, level: int) -> str:
    return rng.choice(VERB_PHRASES[level]).format(aspect=rng.choice(ASPECTS))


def _head(rng: random.Random, family: str, level: int) -> str:
    """The first words of an answer, shaped to continue a prompt of ``family``."""
    if family == "copula":
        return _adjective_phrase(rng, level)
    if family == "noun":
        medium = rng.choice(MEDIA)
        if rng.random() < 0.25:
            return f"{medium} was {rng.choice(NOUN_PHRASES[level])}"
        return f"{medium} {rng.choice(['was', 'felt', 'seemed'])} {_adjective_phrase(rng, level)}"
    choice = rng.randrange(6)
    if choice == 0:
        return f"I thought it was {_adjective_phrase(rng, level)}"
    if choice == 1:
        return f"it was {_adjective_phrase(rng, level)}"
    if choice == 2:
        return f"it was {rng.choice(NOUN_PHRASES[level])}"
    if choice == 3:
        return f"I {_verb_phrase(rng, level)}"
    if choice == 4:
        return f"the {rng.choice(ASPECTS)} was {_adjective_phrase(rng, level)}"
    return f"I found it {_adjective_phrase(rng, level)}"


def _tail(rng: random.Random, level: int) -> str:
    """What follows the head: nothing, a finisher, a second clause or a second sentence."""
    choice = rng.randrange(6)
    if choice == 0:
        return ""
    if choice == 1:
        return f" {rng.choice(FINISHERS)}"
    if choice == 2:
        return f", and the {rng.choice(ASPECTS)} was {_adjective_phrase(rng, level)}"
    if choice == 3:
        return f", and I {_verb_phrase(rng, level)}"
    if choice == 4:
        return f". The {rng.choice(ASPECTS)} was {_adjective_phrase(rng, level)}"
    return f". I {_verb_phrase(rng, level)}"


def _answer(rng: random.Random, family: str) -> str:
    """One continuation of a random sentiment level, 6-20 words, with a leading space."""
    while True:
        level = rng.choice(LEVELS)
        text = f" {_head(rng, family, level)}{_tail(rng, level)}."
        if MIN_ANSWER_WORDS <= len(text.split()) <= MAX_ANSWER_WORDS:
            return text


class _Scorer:
    """VADER compound of ``prompt + answer``, memoised because answers repeat often."""

    def __init__(self) -> None:
        self._analyzer = SentimentIntensityAnalyzer()
        self._cache: dict[str, float] = {}

    def __call__(self, text: str) -> float:
        if text not in self._cache:
            self._cache[text] = self._analyzer.polarity_scores(text)["compound"]
        return self._cache[text]


def _sample_pairs(
    rng: random.Random, prompts: list[tuple[str, str]], n_pairs: int, score: _Scorer
) -> list[dict]:
    """Draw prompt + two answers until ``n_pairs`` distinct pairs clear the VADER margin."""
    pairs: list[dict] = []
    seen: set[tuple[str, str, str]] = set()  # membership only; never iterated
    max_draws = 200 * n_pairs + 1000
    for _ in range(max_draws):
        if len(pairs) == n_pairs:
            break
        family, prompt = rng.choice(prompts)
        first, second = _answer(rng, family), _answer(rng, family)
        s1, s2 = score(prompt + first), score(prompt + second)
        if abs(s1 - s2) < MIN_MARGIN:
            continue
        chosen, rejected = (first, second) if s1 > s2 else (second, first)
        key = (prompt, chosen, rejected)
        if key in seen:
            continue
        seen.add(key)
        pairs.append(
            {
                "id": f"train-{len(pairs):06d}",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "_scores": (max(s1, s2), min(s1, s2)),
            }
        )
    if len(pairs) < n_pairs:
        raise RuntimeError(f"could only draw {len(pairs)} of {n_pairs} distinct pairs")
    return pairs


def _write_jsonl_atomic(path: pathlib.Path, rows: Iterable[dict]) -> None:
    """Write next to ``path`` and rename, so readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_embedded_dataset(
    out_dir: pathlib.Path,
    *,
    seed: int = 0,
    n_train_pairs: int = 2400,
    n_eval_prompts: int = 256,
) -> dict:
    """Write ``train.jsonl`` and ``eval_prompts.jsonl`` into ``out_dir`` and return stats.

    Eval prompts come from a seeded split of the prompt space, so they are held out by
    construction, not by luck. The stats (counts, mean VADER of each side) let the pipeline
    log what it trained on.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    score = _Scorer()

    space = [p for p in _prompt_space() if score(p[1]) == 0.0]
    if n_eval_prompts >= len(space):
        raise ValueError(f"n_eval_prompts must be below {len(space)}, got {n_eval_prompts}")
    rng.shuffle(space)
    eval_prompts, train_prompts = space[:n_eval_prompts], space[n_eval_prompts:]

    pairs = _sample_pairs(rng, train_prompts, n_train_pairs, score)
    scores = [pair.pop("_scores") for pair in pairs]
    chosen_scores = [chosen for chosen, _ in scores]
    rejected_scores = [rejected for _, rejected in scores]

    _write_jsonl_atomic(out_dir / "train.jsonl", pairs)
    _write_jsonl_atomic(
        out_dir / "eval_prompts.jsonl",
        ({"id": f"eval-{i:04d}", "prompt": text} for i, (_, text) in enumerate(eval_prompts)),
    )
    return {
        "n_train_pairs": len(pairs),
        "n_train_prompts": len({p["prompt"] for p in pairs}),
        "n_eval_prompts": len(eval_prompts),
        "n_prompt_space": len(space),
        "mean_chosen_vader": round(sum(chosen_scores) / len(pairs), 4),
        "mean_rejected_vader": round(sum(rejected_scores) / len(pairs), 4),
        "frac_rejected_negative": round(sum(s < 0 for s in rejected_scores) / len(pairs), 4),
    }
