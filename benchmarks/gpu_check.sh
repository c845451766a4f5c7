#!/usr/bin/env bash
# The checks that need a GPU (docs/benchmarks.md, "On a GPU"), in under 9 minutes on one
# H100/H200, the most wanted first, each under its own time limit so that one failure or
# overrun does not stop the rest:
#   1. QLoRA: LoRA r=16 on the 0.5b preset's base in 4-bit NF4, ours and TRL's QLoRA, with our
#      full fine-tuning of the same model beside them (peak GPU memory, pairs/s, first losses),
#      activations recomputed on every side (TRL's default), then without;
#   2. LoRA r=16 on the bf16 base, the same three sides, recomputing;
#   3. the batch-layout ablation (padded / packed / shared_prompt, full fine-tuning) against TRL;
#   4. the real `deepspeed` launcher path (ZeRO-2, bf16, 50 steps).
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (from the repository root)
#
# For a machine that has torch but no internet: the other packages travel as wheels in .whl/
# (made as docs/benchmarks.md says) and are installed into /tmp/site. The log and each
# bench's JSON land in OUT_DIR (default $OUT, else /tmp/gpu-check); the last lines printed
# are one JSON of the figures that matter.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu-check}}
mkdir -p "$out"
log=$out/gpu-check.log
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
  python3 -c "import sys, torch, transformers, trl, deepspeed, peft, bitsandbytes, datasets, \
great_expectations as gx, dpoflow.data_checks.suite; print('python', sys.version.split()[0], \
'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, \
'deepspeed', deepspeed.__version__, 'peft', peft.__version__, 'bitsandbytes', \
bitsandbytes.__version__, 'datasets', datasets.__version__, 'great_expectations', \
gx.__version__)" 2>&1 | grep -v WARN || true
  echo "cpus: $(nproc)"
} 2>&1 | tee -a "$log"

# The 0.5b preset (benchmarks/presets.py): a Qwen2-shaped model of 494 M parameters built from
# a config (random weights), synthetic pairs with prompts ~200 tokens and answers ~250 up to
# max_length 1024, bf16 on both sides, batch 8, 2 untimed steps then 10 timed.
run() {  # run NAME SECONDS ARGS...: one bench command; its text to the log, its JSON to $out
  local name=$1 limit=$2
  shift 2
  echo "== $name: python -m benchmarks dpo --preset 0.5b --device cuda $* (at ${SECONDS} s)" \
    | tee -a "$log"
  timeout "$limit" python3 -m benchmarks dpo --preset 0.5b --device cuda --threads 8 \
    --steps 10 --warmup 2 --json "$out/$name.json" "$@" 2>&1 \
    | grep -v "WARN\|it/s\]\|^\[20" | tee -a "$log" \
    || echo "$name failed or ran out of time (${limit} s)" | tee -a "$log"
}
run dpo-0.5b-qlora-gc 180 --peer trl --lora-r 16 --load-in-4bit --gradient-checkpointing
run dpo-0.5b-qlora 150 --peer trl --lora-r 16 --load-in-4bit
run dpo-0.5b-lora-gc 150 --peer trl --lora-r 16 --gradient-checkpointing
if ((SECONDS < 330)); then
  run dpo-0.5b-ablation $((460 - SECONDS)) --peer trl --packing padded,packed,shared_prompt
fi
if ((SECONDS < 440)); then
  echo "== launcher: python3 benchmarks/gpu_check.py (at ${SECONDS} s)" | tee -a "$log"
  timeout 60 python3 benchmarks/gpu_check.py 2>&1 | grep -v "WARN\|it/s\]" | tail -15 \
    | tee -a "$log" || echo "launcher check failed or ran out of time" | tee -a "$log"
fi
# One JSON of every bench that came back, and a short summary of what matters.
python3 - "$out" <<'PY'
import json, pathlib, sys

out = pathlib.Path(sys.argv[1])
reports = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("dpo-*.json"))}
(out / "report.json").write_text(json.dumps(reports, indent=2))
keys = ("pairs_per_s", "tokens_per_s", "peak_gpu_mb", "matmul_fraction")
summary = {
    name: {
        side: {k: round(r[side][k], 3) for k in keys if k in r[side]}
        | {"losses": [round(v, 5) for v in r[side]["losses"][:3]]}
        for side in ("ours", "full", "trl")
        if side in r
    }
    for name, r in reports.items()
    if "ours" in r
}
print(json.dumps(summary, indent=1))
PY
echo "gpu check: ${SECONDS} s" | tee -a "$log"
