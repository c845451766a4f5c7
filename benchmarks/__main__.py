"""`python -m benchmarks`: our trainer against a named peer (TRL), from a checkout.

The benchmarks are not part of the installed product (`dpoflow`); they import it.

    python -m benchmarks dpo --data PAIRS.jsonl --model MODEL_DIR --peer trl --json out.json
"""

from benchmarks.cli import bench_app

bench_app(prog_name="python -m benchmarks")
