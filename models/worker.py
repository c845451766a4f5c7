"""The entry point of every process DeepSpeed's launcher starts for a job:

    python -m dpoflow.models.worker --local_rank=R --worker dpoflow.models.trainer --job job.json

It imports the job's module (`--worker`: the training loop, or the reference log-probs) with
the garbage collector paused (`dpoflow.process_gc`: about 1 s of CPU less per process on
2 cores) and runs its `main()`, which reads the rest of the command line as its own.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dpoflow.process_gc import imports_without_collection


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--worker", required=True, help="the job's module, with a main()")
    args, rest = parser.parse_known_args()
    sys.argv = [sys.argv[0], *rest]  # --local_rank and --job, for the job's own parser
    with imports_without_collection():
        module = importlib.import_module(args.worker)
    module.main()


if __name__ == "__main__":
    main()
