#!/usr/bin/env bash
# The first contact with a GPU, in one script of at most ~4 minutes on an H100/H200:
#
#   bash benchmarks/gpu_smoke.sh [--out DIR] [--dry-run] [--skip-tests] [--steps 1,2,3,4,5]
#
# Run from the source tree (no install: PYTHONPATH=. python -m charlm ...); needs torch,
# typer, tqdm and pyyaml, and pytest for step 1 (skipped, saying so, without it). Every
# command's output goes to DIR (default gpu-smoke-<timestamp>), one log per step, and a
# summary line per step (PASS / FAIL / SKIP) to stdout and DIR/summary.txt:
#   1. the CUDA parity tests and every CUDA-only test
#   2. a 40-step LSTM train on CUDA; sample and eval of that run with CUDA hidden; a resume
#   3. transformer-gpu for 40 s with train.compile, its compile time reported apart
#   4. charlm bench --json at the CUDA reference shapes (charlm vs cuDNN, one precision)
#   5. the CUDA time loop (each layer one CUDA graph) against the eager path
# --dry-run runs every step that needs no GPU on the CPU, at tiny sizes, and reports the
# others as skipped. --skip-tests leaves step 1 out (the test suite runs this in dry-run);
# --steps runs only the steps listed (the others are reported as not selected).
set -u
cd "$(dirname "$0")/.."
OUT="" DRY=0 SKIP_TESTS=0 STEPS="1,2,3,4,5"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --skip-tests) SKIP_TESTS=1; shift ;;
    --steps) STEPS="$2"; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
OUT="${OUT:-gpu-smoke-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
CHARLM="$PY -m charlm"
FAILED=0
: > "$OUT/summary.txt"

say() { echo "$*" | tee -a "$OUT/summary.txt"; }
# run NAME SECONDS CMD...: the command's output to OUT/NAME.log; PASS or FAIL with its time
run() {
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo "\$ $*" > "$OUT/$name.log"
  if timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1; then
    say "PASS  $name ($((SECONDS - start)) s)"
  else
    local rc=$?
    FAILED=1
    say "FAIL  $name (exit $rc after $((SECONDS - start)) s; see $OUT/$name.log)"
    tail -n 5 "$OUT/$name.log" | sed 's/^/      /' | tee -a "$OUT/summary.txt"
  fi
}
skip() { say "SKIP  $1 ($2)"; }
selected() { case ",$STEPS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

HAS_CUDA=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ "$DRY" = 0 ] && [ "$HAS_CUDA" != 1 ]; then
  echo "gpu_smoke.sh: CUDA is not available here; run with --dry-run to check the rest" >&2
  exit 1
fi
$PY - > "$OUT/environment.txt" 2>&1 <<'PYEOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__,
      "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "| visible", torch.cuda.device_count())
PYEOF
say "charlm gpu smoke test -> $OUT ($(head -n 1 "$OUT/environment.txt"))"
[ "$DRY" = 1 ] && say "dry run: CPU only, tiny sizes; steps that need CUDA are skipped"

if [ "$DRY" = 1 ]; then
  DEV=cpu
  CORPUS="$OUT/corpus.txt"
  $PY -c "import sys; open(sys.argv[1], 'w').write(''.join(f'the quick brown fox {i % 7} jumps over the lazy dog.\n' for i in range(200)))" "$CORPUS"
  TINY=(--set "data.source=$CORPUS" --set model.hidden_size=16 --set model.num_layers=1
        --set model.num_heads=2 --set train.batch_size=4 --set train.seq_len=16
        --set train.eval_steps=2 --set train.sample_length=20)
else
  DEV=cuda
  TINY=()
fi

# ---- 1. the CUDA tests
if ! selected 1; then
  skip "1-cuda-tests" "not selected"
elif [ "$SKIP_TESTS" = 1 ]; then
  skip "1-cuda-tests" "--skip-tests"
elif ! $PY -c "import pytest" 2>/dev/null; then
  skip "1-cuda-tests" "pytest is not installed on this machine: pip install pytest, or run
      python -m pytest -rs tests/test_cells.py -k cuda tests/test_gpu_ready.py elsewhere"
else
  # -rs lists what was skipped: on a GPU no test may say "needs CUDA"
  run 1-cuda-tests 120 $PY -m pytest -q -rs -o addopts="" -p no:cacheprovider \
    tests/test_cells.py -k "cuda or torch_compile" tests/test_gpu_ready.py \
    tests/test_cuda_graph.py
  if [ "$DRY" = 0 ] && grep -q "needs CUDA" "$OUT/1-cuda-tests.log"; then
    FAILED=1; say "FAIL  1-cuda-tests: a CUDA test was skipped on a CUDA machine"
  fi
fi

# ---- 2. LSTM: train on CUDA, then sample and eval with CUDA hidden, then a resume
RUNS="$OUT/runs"
if ! selected 2; then
  skip "2-lstm" "not selected"
else
run 2a-train-lstm 90 $CHARLM train --config lstm --name smoke-lstm --runs-dir "$RUNS" \
  "${TINY[@]}" --set train.device=$DEV --set train.max_steps=40 --set train.max_time=null \
  --set train.eval_interval=20 --set train.log_interval=10
run 2b-sample-cpu 30 env CUDA_VISIBLE_DEVICES= $CHARLM sample --run "$RUNS/smoke-lstm" \
  --prime "def " --length 200 --seed 1 --device cpu
run 2c-eval-cpu 60 env CUDA_VISIBLE_DEVICES= $CHARLM eval --run "$RUNS/smoke-lstm" --device cpu
run 2d-resume 60 $CHARLM train --name smoke-lstm --runs-dir "$RUNS" --resume \
  --set train.max_steps=60
fi

# ---- 3. transformer-gpu for 40 s, compiled, the compile time apart
if ! selected 3; then
  skip "3-transformer" "not selected"
elif [ "$DRY" = 1 ]; then
  # no compile here: Inductor's C++ compile of even a tiny model takes longer than the
  # whole dry run; tests/test_gpu_ready.py holds the compile-before-the-clock logic
  run 3-transformer 60 $CHARLM train --config transformer --name smoke-transformer \
    --runs-dir "$RUNS" "${TINY[@]}" --set train.device=cpu --set train.max_steps=20 \
    --set train.max_time=null --set train.eval_interval=20
else
  run 3-transformer 150 $CHARLM train --config transformer-gpu --name smoke-transformer \
    --runs-dir "$RUNS" --set train.max_time=40 --set train.compile=true
  grep -h "compiled the model in" "$OUT/3-transformer.log" | sed 's/^/      /' \
    | tee -a "$OUT/summary.txt"
fi

# ---- 4. charlm bench --json: charlm vs cuDNN in one precision, with peak memory
if ! selected 4; then
  skip "4-bench" "not selected"
else
if [ "$DRY" = 1 ]; then
  BENCH=(--quick --device cpu --cells lstm,transformer)
else
  BENCH=(--device cuda --cells lstm,gru,transformer --repeats 3)
fi
# the JSON (stdout) to bench.json, the progress lines (stderr) to the log
run 4-bench 150 bash -c '"$@" > "$0"' "$OUT/bench.json" $CHARLM bench "${BENCH[@]}" --json
$PY - "$OUT/bench.json" 2>/dev/null <<'PYEOF' | tee -a "$OUT/summary.txt"
import json, sys
text = open(sys.argv[1]).read()
r = json.loads(text)
p = r.get("precision", {})
print(f"      precision: recurrent {p.get('recurrent')}, transformer {p.get('transformer')}, "
      f"math {p.get('math')}")
for x in r["ratios"]:
    print(f"      {x['task']:6} {x['contender']:28} {x['ratio']:.2f}x {x['reference']}")
kv = r["kv_cache"]
print(f"      kv cache {kv['speedup']:.2f}x (target {kv['target']}, meets {kv['meets_target']})")
for c in r["contenders"]:
    if c["peak_mem_bytes"]:
        print(f"      peak mem {c['name']}: {c['peak_mem_bytes'] / 2**20:.0f} MiB")
PYEOF
fi

# ---- 5. the CUDA time loop (each layer a CUDA graph) against the eager CUDA path
if ! selected 5; then
  skip "5-cuda-time-loop" "not selected"
else
if [ "$DRY" = 1 ]; then
  LOOP=(--device cpu --hidden 16 --batch 4 --seq 8 --steps 2 --repeats 1)
else
  LOOP=(--device cuda --hidden 512 --batch 64 --seq 256 --steps 10 --repeats 3)
fi
run 5-cuda-time-loop 90 bash -c '"$@" > "$0"' "$OUT/time-loop.json" \
  $PY benchmarks/cuda_time_loop.py "${LOOP[@]}" --json
grep -h "steps/s" "$OUT/5-cuda-time-loop.log" | sed 's/^/      /' | tee -a "$OUT/summary.txt"
fi

if [ "$FAILED" = 0 ]; then say "all steps that ran passed"; else say "SOME STEPS FAILED"; fi
exit "$FAILED"
