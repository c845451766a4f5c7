#!/usr/bin/env bash
# One short check for a lent GPU machine (torch there, no internet):
# ~50 DPO steps on one GPU, ZeRO-2, bf16, a ~100 M-parameter Llama built from a
# config; prints pairs/s, tokens/s and peak GPU memory.
#   bash benchmarks/gpu_check.sh        (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || true
exec python3 benchmarks/gpu_check.py "$@"
