"""Time `validate_preferences` on 100,000 synthetic pairs.

Validation runs before every training job, so it must stay in seconds at realistic sizes.
Run: python benchmarks/validate_bench.py [n_pairs]
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script
from dpoflow.data_checks.suite import validate_preferences  # noqa: E402

WORDS = "the a model answer helpful question data train prefer short long clear kind".split()


def synthetic_pairs(n: int, seed: int = 0) -> pd.DataFrame:
    """Distinct pairs of realistic length (a few dozen words each)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choices(WORDS, k=k))

    rows = {
        "id": [f"ex-{i}" for i in range(n)],
        "prompt": [f"{i}: {text(20)}?" for i in range(n)],
        "chosen": [text(60) for _ in range(n)],
        "rejected": [text(40) for _ in range(n)],
    }
    return pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in rows.items()})


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    df = synthetic_pairs(n)
    import great_expectations  # noqa: F401 - exclude the one-off ~3 s import from the timing

    eval_prompts = df["prompt"].sample(100, random_state=0).str.upper().tolist()
    start = time.perf_counter()
    report = validate_preferences(df, eval_prompts=eval_prompts)
    seconds = time.perf_counter() - start
    print(f"validate_preferences: {n} pairs in {seconds:.2f} s (success={report.success})")


if __name__ == "__main__":
    main()
