#!/usr/bin/env bash
# One short, offline check of lopa on a CUDA GPU, in four steps, within 8 minutes:
#   1. pytest -m gpu            the test suite's GPU tests
#   2. lopa train               50 steps of prompt tuning in bf16 on a small task file this script writes
#   3. lopa serve --device cuda with one classify and one generate round trip (the trained artifact, --url)
#   4. lopa bench serving       at K = 1, 8, 64, 512 on the GPU (skipped, saying so, where the installed lopa has no --device)
#
# Usage: scripts/device_check.sh [OUT]        (OUT: results folder, default device-check-<time>)
# Settings (environment): MODEL (default smollm2-135m), PYTHON (default python), STEPS (50), PORT (8765),
# DEVICE (cuda; cpu rehearses the steps on a machine without a GPU, steps 1 and 4 then prove nothing),
# BENCH_TASKS (1,8,64,512) and BENCH_REQUESTS (64): the benchmark's K values and requests per K.
# Time limits per step (s): GPU 60, tests 90, train 120, server start 60, each round trip 30, benchmark 240;
# and BUDGET (default 480) for the whole run: a step gets at most what is left of it, so the script ends
# within BUDGET seconds plus 10 s of kill grace. Measured on an H200: about 5 minutes end to end.
# Everything goes to OUT/device_check.log (each step's own output also to OUT/<step>.log); one summary line
# per step on stdout and in OUT/summary.txt. Exit status: 0 all steps passed or were skipped with a reason,
# 1 a step failed or ran out of time, 2 bad usage, 3 no CUDA GPU (found in seconds, before any step).
# No network is used: the model must be one lopa loads offline (the default is) or a local directory.
set -uo pipefail

OUT=${1:-device-check-$(date -u +%Y%m%d-%H%M%S)}
MODEL=${MODEL:-smollm2-135m}
PY=${PYTHON:-python}
STEPS=${STEPS:-50}
PORT=${PORT:-8765}
DEVICE=${DEVICE:-cuda}
BENCH_TASKS=${BENCH_TASKS:-1,8,64,512}
BENCH_REQUESTS=${BENCH_REQUESTS:-64}
BUDGET=${BUDGET:-480}
KEY=device-check-key

case "$STEPS$PORT$BENCH_REQUESTS$BUDGET" in *[!0-9]*|"")
  echo "device_check: STEPS, PORT, BENCH_REQUESTS and BUDGET must be whole numbers (got '$STEPS', '$PORT', '$BENCH_REQUESTS', '$BUDGET')" >&2; exit 2;; esac
case "$BENCH_TASKS" in *[!0-9,]*|"") echo "device_check: BENCH_TASKS must be comma-separated whole numbers (got '$BENCH_TASKS')" >&2; exit 2;; esac
case "$DEVICE" in cuda|cuda:[0-9]*|cpu) ;; *) echo "device_check: DEVICE must be cuda, cuda:N or cpu (got '$DEVICE')" >&2; exit 2;; esac
mkdir -p "$OUT" || { echo "device_check: cannot create $OUT" >&2; exit 2; }
LOG="$OUT/device_check.log"
SUMMARY="$OUT/summary.txt"
: >"$LOG"; : >"$SUMMARY"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false LOPA_API_KEY=$KEY

say() { echo "$*" | tee -a "$SUMMARY" "$LOG"; }
FAILED=0
SERVER_PID=

cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$SERVER_PID" 2>/dev/null
  fi
}
trap cleanup EXIT
trap 'cleanup; exit 130' INT TERM

# seconds left of the whole run's BUDGET (SECONDS counts from the script's start)
left() { echo $((BUDGET - SECONDS)); }

# step NAME SECONDS COMMAND...: run under timeout (the step's own limit or what is left of BUDGET, whichever
# is less), log it, print one summary line
step() {
  local name=$1 limit=$2; shift 2
  local start=$SECONDS rc
  [ "$(left)" -lt "$limit" ] && limit=$(left)
  if [ "$limit" -le 0 ]; then
    say "$name: FAILED, not run: the whole run's budget of $BUDGET s is spent"; FAILED=1; return 124
  fi
  echo "=== $name: $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  cat "$OUT/$name.log" >>"$LOG"
  if [ $rc -eq 0 ]; then
    say "$name: ok ($((SECONDS - start)) s)"
  elif [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    say "$name: FAILED, out of time after ${limit} s (see $OUT/$name.log; budget left $(left) s)"; FAILED=1
  else
    say "$name: FAILED, exit status $rc after $((SECONDS - start)) s (see $OUT/$name.log; last line: $(tail -n 1 "$OUT/$name.log"))"; FAILED=1
  fi
  return $rc
}
skip() { say "$1: SKIPPED, $2"; }

# 0. the GPU, first and fast: without one nothing below means anything
if [ "$DEVICE" != cpu ]; then
  if ! timeout 60 "$PY" - "$DEVICE" >>"$LOG" 2>&1 <<'EOF'
import sys
import torch
dev = torch.device(sys.argv[1])
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA GPU (built for CUDA {torch.version.cuda})")
if dev.index is not None and dev.index >= torch.cuda.device_count():
    sys.exit(f"{dev} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
print(f"GPU: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"bf16 {torch.cuda.is_bf16_supported()}")
EOF
  then
    say "gpu: FAILED, no usable CUDA GPU: $(tail -n 1 "$LOG") (DEVICE=cpu rehearses the steps without one)"
    exit 3
  fi
  say "gpu: $(tail -n 1 "$LOG")"
fi

# 1. the suite's GPU tests (they skip themselves where there is no GPU)
# (less test_quick_on_cuda: step 4 runs that benchmark on the GPU at full size, and the quick one alone takes a minute)
step pytest_gpu 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests \
  --deselect tests/test_bench_serving.py::test_quick_on_cuda

# 2. training: a small classification task written here (no download), 50 steps in bf16
DATA="$OUT/reviews.jsonl"
"$PY" - "$DATA" <<'EOF'
import json, random, sys
good = ["a gripping, funny film", "warm and clever", "the best thing this year", "beautifully acted",
        "a joy from start to end", "sharp writing and a great cast"]
bad = ["dull and far too long", "a tired, lazy script", "I walked out", "flat jokes and wooden acting",
       "a waste of two hours", "nothing works here"]
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for i in range(240):
        label = i % 2
        text = f"{rng.choice(good if label else bad)}, {rng.choice(good if label else bad)}."
        f.write(json.dumps({"text": text, "label": "great" if label else "terrible"}) + "\n")
EOF
RUN="$OUT/run"
# the precision is bf16 on a GPU; on the cpu rehearsal, auto (a CPU may have no fast bf16)
PREC=bf16; [ "$DEVICE" = cpu ] && PREC=auto
ARTIFACT=
if step train 120 "$PY" -m lopa train --method prompt-tuning --task "$DATA" --template '{text} It was' \
     --label-words ' terrible, great' --model "$MODEL" --max-steps "$STEPS" --batch-size 8 --precision "$PREC" \
     --out "$RUN"; then
  cfg=$(find "$RUN" -name soft_prompt_config.json -path '*best*' | head -n 1)
  [ -n "$cfg" ] || cfg=$(find "$RUN" -name soft_prompt_config.json | head -n 1)
  if [ -n "$cfg" ]; then ARTIFACT=$(dirname "$cfg"); else say "train: FAILED, no artifact (soft_prompt_config.json) under $RUN"; FAILED=1; fi
fi

# 3. the server on the device, one classify and one generate round trip with the trained artifact
if [ -z "$ARTIFACT" ]; then
  skip serve "no trained artifact (step train failed)"
else
  URL="http://127.0.0.1:$PORT"
  "$PY" -m lopa serve --model "$MODEL" --device "$DEVICE" --port "$PORT" --max-wait-ms 2 --log-level warning \
    >"$OUT/serve_server.log" 2>&1 &
  SERVER_PID=$!
  healthy=0
  for _ in $(seq 1 300); do  # 60 s for the model to load, within the budget
    kill -0 "$SERVER_PID" 2>/dev/null || break
    [ "$(left)" -gt 0 ] || break
    if "$PY" -c "import sys, httpx; sys.exit(httpx.get('$URL/health', timeout=1).status_code != 200)" 2>/dev/null; then
      healthy=1; break
    fi
    sleep 0.2
  done
  cat "$OUT/serve_server.log" >>"$LOG"
  if [ $healthy -ne 1 ]; then
    say "serve: FAILED, the server did not become healthy within 60 s (see $OUT/serve_server.log; last line: $(tail -n 1 "$OUT/serve_server.log"))"
    FAILED=1
  else
    say "serve: healthy on $URL"
    step serve_classify 30 "$PY" -m lopa classify --artifact "$ARTIFACT" --url "$URL" --apply-template \
      --text "a gripping, funny film, warm and clever." "dull and far too long, nothing works here."
    step serve_generate 30 "$PY" -m lopa generate --artifact "$ARTIFACT" --url "$URL" --max-new-tokens 8 \
      --text "The capital of France is"
  fi
  cleanup; SERVER_PID=
fi

# 4. the serving benchmark on the device (its figures: OUT/bench/serving.json and OUT/bench/results.md)
if "$PY" -m lopa bench serving --help 2>/dev/null | grep -q -- "--device"; then
  step bench_serving 240 "$PY" -m lopa bench serving --device "$DEVICE" --model "$MODEL" --tasks "$BENCH_TASKS" \
    --requests "$BENCH_REQUESTS" --repeats 1 --gen-requests 16 --new-tokens 16 --no-vllm \
    --out "$OUT/bench" --doc "$OUT/bench/results.md"
else
  skip bench_serving "lopa bench serving has no --device option in this version: its contenders run on the CPU only"
fi

if [ $FAILED -eq 0 ]; then say "device_check: all steps passed (or skipped, with the reason above); log: $LOG"
else say "device_check: FAILED (see the lines above); log: $LOG"; fi
exit $FAILED
