#!/usr/bin/env bash
# The benchmark against TRL on one GPU (docs/benchmarks.md, "On a GPU"), in under 8 minutes:
# the 0.5b preset (benchmarks/presets.py) with ours in each batch layout and TRL side by side,
# LoRA where the bench has it, then the real `deepspeed` launcher path (ZeRO-2) if time is left.
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

# 1. What users train: 0.5 B parameters (Qwen2 shape, random weights), prompts ~200 tokens,
#    answers ~250, max_length 1024, bf16 on both sides. Our DPO in each batch layout
#    (padded / packed / packed + shared prompt) and TRL's DPOTrainer, side by side on the same
#    pairs (benchmarks/ablation.py): tokens/s, pairs/s, peak GPU memory, MFU (matmul_fraction,
#    against the measured bf16 matmul ceiling).
run() {  # run NAME SECONDS ARGS...: one bench command, its text and JSON under $out
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 -m benchmarks dpo --preset 0.5b --device cuda --threads 8 \
    --steps 10 --warmup 2 --json "$out/$name.json" "$@" 2>&1 | grep -v "WARN\|it/s\]" \
    | tee "$out/$name.txt" || echo "$name failed or ran out of time" | tee -a "$out/$name.txt"
}
run dpo-0.5b-ablation 280 --peer trl --packing padded,packed,shared_prompt
# 2. LoRA, where the bench has it (--lora-r): ours with the shared prompt against TRL's PEFT.
if python3 -m benchmarks dpo --help 2>/dev/null | grep -q -- "--lora-r" && (( SECONDS < 300 )); then
  run dpo-0.5b-lora 100 --peer trl --packing shared_prompt --lora-r 16
fi
# 3. The real `deepspeed` launcher path (ZeRO-2, bf16, 50 steps), if time is left.
if (( SECONDS < 380 )); then
  timeout 60 python3 benchmarks/gpu_check.py 2>&1 | grep -v "WARN\|it/s\]" | tail -15 \
    | tee "$out/launcher-zero2.txt" || true
fi
# One JSON of everything that came back (each bench's own JSON is beside it).
python3 - "$out" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
reports = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("dpo-*.json"))}
(out / "report.json").write_text(json.dumps(reports, indent=2))
print("reports:", ", ".join(reports) or "none")
PY
echo "gpu check: ${SECONDS} s"
