#!/usr/bin/env bash
# The benchmark against TRL on one GPU (docs/benchmarks.md, "On a GPU"): a 138 M-parameter
# Llama (benchmarks/make_model.py --preset 140m), bf16 on both sides, DPO then SFT; then the
# real `deepspeed` launcher path (ZeRO-2) through benchmarks/gpu_check.py if time is left.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (from the repository root)
#
# For a machine that has torch, transformers and accelerate but no internet: the other
# packages travel as wheels in .whl/ (made as docs/benchmarks.md says) and are installed into
# /tmp/site. Reports land in OUT_DIR (default $OUT, else /tmp/gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
# dpoflow itself, under its one import name (its folders are mapped by pyproject.toml).
python3 -m pip install -q --no-index --no-deps --no-build-isolation --target /tmp/site-dpoflow .
export PYTHONPATH=/tmp/site-dpoflow${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import sys, torch, transformers, trl, deepspeed; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, \
'deepspeed', deepspeed.__version__)" 2>&1 | grep -v WARN
  nproc
} | tee "$out/machine.txt"

data=$(python3 -c "from dpoflow.tasks.sources import ensure_embedded_data as e; print(e('.dpoflow'))")/train.jsonl
model=.dpoflow/bench/llama-140m
python3 -m benchmarks.make_model --preset 140m --data "$data" --out "$model" 2>&1 | tail -1

bench() {  # bench dpo|sft NAME REPEATS
  python3 -m benchmarks "$1" --model "$model" --data "$data" --device cuda --peer trl \
    --steps 30 --warmup 5 --batch-size 64 --max-length 256 --threads 8 --repeats "$3" \
    --json "$out/$2.json" 2>&1 | grep -v "WARN\|it/s\]" | tee "$out/$2.txt"
}
bench dpo dpo-140m-gpu 2 || echo "dpo bench failed"
bench sft sft-140m-gpu 1 || echo "sft bench failed"
if (( SECONDS < 240 )); then  # the launcher path: ZeRO-2, bf16, 50 steps (if time is left)
  timeout 120 python3 benchmarks/gpu_check.py 2>&1 | grep -v "WARN\|it/s\]" | tail -15 \
    | tee "$out/launcher-zero2.txt" || true
fi
echo "gpu check: ${SECONDS} s"
