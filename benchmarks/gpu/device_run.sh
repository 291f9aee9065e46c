#!/usr/bin/env bash
# The GPU benchmark, in one script, run ON THE DEVICE MACHINE from the repo root:
#   bash benchmarks/gpu/device_run.sh [BUDGET_S]        (default 540 s, everything included)
# Needs what benchmarks/gpu/prepare.sh builds (see README.md beside this file for the carry lists). Steps, in
# this order (BBT_GPU_STEPS overrides the list): each is timed, logs under the results folder, and a failed
# step is recorded and the next one runs; a step that cannot start with its minimum time left is skipped.
#   stash     copy any carried .gpu/smollm2.gguf.part-* to $WORK/gguf (always done first; alone for the part calls)
#   env       pure-Python wheels to $WORK/site, bbt_onnx_export -> export/ link, unpack the ORT GPU pack,
#             preload_dlls, providers, a one-node CUDA smoke test, versions, nvidia-smi
#             (then, in the background: the GGUF put together and SmolLM2 exported for `fewshot`)
#   export    a RoBERTa-large-shaped random model (benchmarks/gpu/make_large.py), `bbt-onnx export --fp16`
#   parity    every graph on CUDA vs the fp32 graph on CPU, same inputs (benchmarks/gpu/parity.py)
#   bench640  `bbt-onnx bench --device cuda --batch 640 --seq 114 --json` (fp16, fp32, torch eager/SDPA fp16)
#   e2e       8000-call tunes, full CMA-ES and --diagonal, 32 rows x ~64 tokens (benchmarks/gpu/e2e.py)
#   bench32   `bbt-onnx bench --device cuda --batch 32 --seq 114 --precision fp16 --json`
#   fewshot   benchmarks/real_fewshot.py --config gpu --device cuda --precision fp16 on MR, then BBC: one run per
#             task and method, data seed 0, the BBT_GPU_SEEDS in lock-step (their ensemble), written to
#             results/runs/NAME/run.json (each task an equal share of the time left; a run cut short has none)
#   check     `bbt-onnx check --engines cpu:fp32,cuda:fp32,cuda:fp16 --json`, when the checkout has that command
# Export runs with the device's own onnxruntime (CPU; its onnxruntime.transformers optimizer, which the GPU pack
# drops); everything that runs a graph on CUDA runs with the pack first on PYTHONPATH.
# Writes to $OUT (at most 8 files come back): summary.json, summary.txt, results.tar.gz (every log and JSON).
# Env: BBT_GPU_DRY=1 runs the same plumbing on CPU with tiny shapes (benchmarks/gpu/dry_run.sh);
#      BBT_GPU_SEEDS (0,1,2), BBT_GPU_TASKS (mr,bbc), BBT_GPU_METHODS (bbt,bbtv2), BBT_GPU_DEEP (0: no deep graphs
#      for the large model), BBT_GPU_WORK (/tmp/bbt-gpu), BBT_GPU_PYTHON (python3).
set -u -o pipefail
START=$(date +%s)
BUDGET=${1:-540}
RESERVE=15                                   # seconds kept for the summary and the archive
DEADLINE=$((START + BUDGET - RESERVE))
REPO=$(pwd)
DRY=${BBT_GPU_DRY:-0}
WORK=${BBT_GPU_WORK:-/tmp/bbt-gpu}
OUT=${OUT:-$WORK/out}
PY=${BBT_GPU_PYTHON:-python3}
RES=$WORK/results
MODELS=$WORK/models
SITE=$WORK/site
PKGS=$WORK/pkgs
ORT_DIR=$WORK/ort
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
SEEDS=${BBT_GPU_SEEDS:-0,1,2}
TASKS=${BBT_GPU_TASKS:-mr,bbc}
METHODS=${BBT_GPU_METHODS:-bbt,bbtv2}
if [ "$DRY" = 1 ]; then                      # CPU, tiny shapes, a few calls: the plumbing only
  DEV=cpu; PREC=fp32; FEWSHOT_CONFIG=cpu; SEEDS=${BBT_GPU_SEEDS:-0}; DEEP=${BBT_GPU_DEEP:-1}
  LARGE_ARGS="--hidden 64 --layers 2 --heads 4 --intermediate 128 --max-positions 128 --vocab 0"
  BIG_BATCH=64; SMALL_BATCH=32; SEQ=80; REPEAT=1; PARITY_BATCH=32; E2E_ARGS="--budget 40 --dim 50"
  THREADS="--threads ${BBT_GPU_THREADS:-1}"; export OMP_NUM_THREADS=${BBT_GPU_THREADS:-1}
  DEFAULT_STEPS="env export parity bench640 e2e bench32 fewshot check"
else
  DEV=cuda; PREC=fp16; FEWSHOT_CONFIG=gpu; DEEP=${BBT_GPU_DEEP:-0}
  LARGE_ARGS=""                              # make_large.py's defaults: H 1024, 24 layers, 16 heads, FFN 4096
  BIG_BATCH=640; SMALL_BATCH=32; SEQ=114; REPEAT=10; PARITY_BATCH=64; E2E_ARGS="--budget 8000 --dim 500"
  THREADS=""
  DEFAULT_STEPS="env export parity bench640 e2e bench32 fewshot check"
fi
STEPS=${BBT_GPU_STEPS:-$DEFAULT_STEPS}
rm -rf "$RES"
mkdir -p "$OUT" "$RES" "$MODELS" "$SITE" "$PKGS" "$WORK/gguf"
: > "$RES/steps.jsonl"
LOG=$RES/device_run.log
exec 3>&1                                    # the console, for the summary once the log's tee is closed
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

# the two environments: export (the device's own onnxruntime) and run (the GPU pack first)
PP_EXPORT="$REPO:$PKGS:$SITE${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DRY" = 1 ]; then PP_RUN=$PP_EXPORT; else PP_RUN="$ORT_DIR:$PP_EXPORT"; fi
SMOL_DIR=$MODELS/smollm2
LARGE=$MODELS/large
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export REPO DRY PY WORK RES MODELS SITE PKGS ORT_DIR GGUF DEV PREC PP_RUN PP_EXPORT SMOL_DIR METHODS   # for bash -c steps

left() { echo $((DEADLINE - $(date +%s))); }
note() { echo "[$(date +%T) +$(( $(date +%s) - START ))s] $*"; }
record() {  # step status rc seconds detail
  printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "detail": "%s"}\n' "$1" "$2" "$3" "$4" \
    "$(printf '%s' "$5" | tr '"\\\n\t' "'/  " | tr -d '\000-\037' | cut -c1-300)" >> "$RES/steps.jsonl"
  note "step $1: $2 (rc $3, $4 s)${5:+ - $5}"
}
# run_step NAME MIN_SECONDS STDOUT_FILE CMD...: stderr (and stdout when STDOUT_FILE is -) to $RES/NAME.log;
# runs under `timeout` with the time left (or $CAP seconds, when less)
run_step() {
  local name=$1 need=$2 outf=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$need" ] || [ "$l" -lt 1 ]; then record "$name" skipped null 0 "${l}s left, needs ${need}s"; return 1; fi
  if [ -n "${CAP:-}" ] && [ "$CAP" -lt "$l" ]; then l=$CAP; fi   # CAP: this step's share of what is left
  note "step $name: $* (limit ${l}s)"
  local t0 rc; t0=$(date +%s.%N)
  if [ "$outf" = - ]; then timeout -k 10 "$l" "$@" > "$RES/$name.log" 2>&1; rc=$?
  else timeout -k 10 "$l" "$@" > "$outf" 2> "$RES/$name.log"; rc=$?; fi
  local dt; dt=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
  local status=ok; [ $rc = 0 ] || status=failed; [ $rc = 124 ] || [ $rc = 137 ] && status=timeout
  record "$name" "$status" "$rc" "$dt" "$( [ $rc = 0 ] || tail -n 3 "$RES/$name.log")"
  return $rc
}
has_step() { [[ " $STEPS " == *" $1 "* ]]; }

finish() {
  trap - EXIT
  note "done in $(( $(date +%s) - START )) s of a ${BUDGET} s budget; summary:"
  exec 1>&3 2>&3                             # close the tee, so the log is whole and the summary ends the output
  wait "$TEE_PID" 2>/dev/null
  PYTHONPATH=$PP_EXPORT "$PY" "$REPO/benchmarks/gpu/summarize.py" "$RES" "$OUT/summary.json" > "$OUT/summary.txt" \
    2>> "$LOG" || echo "summarize.py failed: see the end of device_run.log" >> "$OUT/summary.txt"
  cp "$LOG" "$OUT/device_run.log" 2>/dev/null
  tar -czf "$OUT/results.tar.gz" -C "$WORK" results 2>/dev/null
  ls -l "$OUT" | tail -n +2
  cat "$OUT/summary.txt"
}
trap finish EXIT

note "device_run.sh: budget ${BUDGET}s, steps: $STEPS, dry=$DRY, work=$WORK, out=$OUT"

# ---------------------------------------------------------------- stash: GGUF parts arrive over two calls
stash() {
  local n=0
  for p in "$REPO"/.gpu/smollm2.gguf.part-*; do
    [ -f "$p" ] || continue
    cmp -s "$p" "$WORK/gguf/$(basename "$p")" || cp -f "$p" "$WORK/gguf/"
    n=$((n + 1))
  done
  echo "carried $n part(s); stashed: $(cd "$WORK/gguf" && ls smollm2.gguf.part-* 2>/dev/null | tr '\n' ' ')"
}
export -f stash
run_step stash 0 - bash -c stash
cat "$RES/stash.log"

# ---------------------------------------------------------------- env
step_env() {
  set -e
  ls "$REPO"/.gpu/whl/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.gpu/whl/*.whl
  ln -sfn "$REPO/export" "$PKGS/bbt_onnx_export"
  if [ "$DRY" = 1 ] && [ "${BBT_GPU_DRY_ORT:-1}" = 1 ] && [ -s "$REPO/.gpu/ort-gpu-sm90.tar.xz" ]; then
    rm -rf "$ORT_DIR"; mkdir -p "$ORT_DIR"   # dry: unpack to check the archive; this Python cannot load it
    xz -dc "$REPO/.gpu/ort-gpu-sm90.tar.xz" | tar -x -C "$ORT_DIR"
  elif [ "$DRY" != 1 ] && [ ! -f "$ORT_DIR/onnxruntime/__init__.py" ]; then
    mkdir -p "$ORT_DIR"
    xz -dc "$REPO/.gpu/ort-gpu-sm90.tar.xz" | tar -x -C "$ORT_DIR"
  fi
  ls -l "$ORT_DIR"/onnxruntime/capi/*.so* 2>/dev/null || echo "no ORT pack unpacked"
  if [ "$DRY" != 1 ]; then
    # preload_dlls() looks for nvidia/cu13/lib and nvidia/cudnn/lib beside the onnxruntime folder (site-packages
    # for a pip install); here that folder is $ORT_DIR, so it gets a link to the nvidia-* wheels torch brought
    nv=$("$PY" -c "import importlib.util as u; s = u.find_spec('nvidia'); print(list(s.submodule_search_locations)[0] if s else '')")
    if [ -n "$nv" ] && [ "$nv" != "$ORT_DIR/nvidia" ]; then ln -sfn "$nv" "$ORT_DIR/nvidia"; fi
    ls "$ORT_DIR"/nvidia/ 2>/dev/null | tr '\n' ' '; echo
  fi
  PYTHONPATH=$PP_RUN "$PY" "$REPO/benchmarks/gpu/probe.py" --device "$DEV" --json-out "$RES/env.json"
}
NV_LIBS=""
if has_step env; then
  export -f step_env
  if ! run_step env 10 - bash -c step_env && [ "$DRY" != 1 ]; then
    # preload_dlls found no CUDA/cuDNN: retry with the nvidia-* wheels' lib folders on LD_LIBRARY_PATH
    NV_LIBS=$("$PY" - <<'PY' 2>/dev/null
import importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = []
for root in (spec.submodule_search_locations if spec else []):
    for d, _, files in os.walk(root):
        if os.path.basename(d) == "lib" and any(".so" in f for f in files):
            dirs.append(d)
print(":".join(sorted(set(dirs))))
PY
)
    if [ -n "$NV_LIBS" ]; then
      export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
      mv "$RES/env.log" "$RES/env-first.log"
      run_step env 10 - bash -c step_env
    fi
  fi
fi

# ---------------------------------------------------------------- SmolLM2, in the background (CPU work)
SMOL_PID=""
smollm2_export() {
  set -e
  if [ "$DRY" = 1 ]; then   # a tiny random Llama stands in for SmolLM2 (its export is the same code path)
    rm -rf "$WORK/smollm2-src"
    "$PY" -c "from bbt_onnx_export.tiny import make_tiny_causal; make_tiny_causal('$WORK/smollm2-src', max_positions=256)"
    GGUF_ARGS=""
  else
    mkdir -p "$WORK/smollm2-src"
    (cd "$WORK/gguf" && cat smollm2.gguf.part-* > "$WORK/smollm2-src/$GGUF")
    (cd "$WORK/smollm2-src" && sha256sum -c "$REPO/benchmarks/gpu/smollm2.gguf.sha256")
    GGUF_ARGS="--gguf-file $GGUF"
  fi
  # real_fewshot.py's ensure_model: P = 50, fp16 when asked, deep graphs, the cached pair; it finds this manifest
  # and skips its own.
  "$PY" -m bbt_onnx.cli export --model "$WORK/smollm2-src" $GGUF_ARGS --out "$SMOL_DIR" --prompt-tokens 50 \
    $([ "$PREC" = fp16 ] && echo --fp16) $([[ "$METHODS" == *bbtv2* ]] && echo --deep) --kv-cache --force
}
if has_step fewshot; then
  if [ "$DRY" = 1 ] || [ -n "$(ls "$WORK"/gguf/smollm2.gguf.part-* 2>/dev/null)" ]; then
    export -f smollm2_export
    # half the cores, so the large model's export next to it keeps the rest
    ( PYTHONPATH=$PP_EXPORT OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(has_step export && echo 8 || nproc)} run_step smollm2_export 60 - \
        nice -n 5 bash -c smollm2_export ) > "$RES/smollm2_bg.out" 2>&1 &   # off the console's tee
    SMOL_PID=$!
  else
    record smollm2_export skipped null 0 "no GGUF parts stashed: calls 1 and 2 (the parts) did not reach this machine"
  fi
fi

# ---------------------------------------------------------------- export: RoBERTa-large shape
if has_step export; then
  PYTHONPATH=$PP_EXPORT run_step build 30 "$RES/build.json" "$PY" "$REPO/benchmarks/gpu/make_large.py" \
      "$MODELS/large-src" $LARGE_ARGS &&
    PYTHONPATH=$PP_EXPORT run_step export 60 - "$PY" -m bbt_onnx.cli export --model "$MODELS/large-src" \
      --out "$LARGE" --prompt-tokens 50 --fp16 $([ "$DEEP" = 1 ] && echo --deep) --force
  [ -f "$LARGE/manifest.json" ] && cp "$LARGE/manifest.json" "$RES/large_manifest.json"
fi
have_large() { [ -f "$LARGE/manifest.json" ] || { record "$1" skipped null 0 "no exported large model"; return 1; }; }

if has_step parity && have_large parity; then
  PYTHONPATH=$PP_RUN run_step parity 30 "$RES/parity.stdout" "$PY" "$REPO/benchmarks/gpu/parity.py" "$LARGE" \
    --device "$DEV" --batch "$PARITY_BATCH" --seq "$SEQ" $THREADS --json-out "$RES/parity.json"
fi

if has_step bench640 && have_large bench640; then
  PYTHONPATH=$PP_RUN run_step bench640 45 "$RES/bench_$BIG_BATCH.json" "$PY" -m bbt_onnx.cli bench \
    --model "$LARGE" --device "$DEV" --batch "$BIG_BATCH" --seq "$SEQ" --repeat "$REPEAT" --e2e-budget 0 $THREADS --json
fi

if has_step e2e && have_large e2e; then
  PYTHONPATH=$PP_RUN run_step e2e 45 "$RES/e2e.stdout" "$PY" "$REPO/benchmarks/gpu/e2e.py" "$LARGE" \
    --device "$DEV" --precision "$PREC" $E2E_ARGS --seq-target 64 $THREADS --json-out "$RES/e2e.json"
fi

if has_step bench32 && have_large bench32; then
  PYTHONPATH=$PP_RUN run_step bench32 30 "$RES/bench_$SMALL_BATCH.json" "$PY" -m bbt_onnx.cli bench \
    --model "$LARGE" --device "$DEV" --batch "$SMALL_BATCH" --seq "$SEQ" --repeat "$REPEAT" --precision "$PREC" \
    --e2e-budget 0 $THREADS --json
fi

# ---------------------------------------------------------------- fewshot: SmolLM2, real data
if has_step fewshot; then
  if [ -n "$SMOL_PID" ] && [ "$(left)" -ge 40 ]; then
    note "waiting for the SmolLM2 export"
    wait "$SMOL_PID"
  fi
  if [ "$(left)" -lt 40 ]; then
    record fewshot skipped null 0 "$(left)s left, needs 40s"
  elif [ -f "$SMOL_DIR/manifest.json" ]; then
    tasks=(${TASKS//,/ })
    for i in "${!tasks[@]}"; do
      task=${tasks[$i]}
      [ -f "$REPO/.data/$task/pool.csv" ] || { record "fewshot_$task" skipped null 0 ".data/$task not carried"; continue; }
      # each task gets an equal share of what is left, so a slow first task leaves time for the next
      CAP=$(( $(left) / (${#tasks[@]} - i) )) PYTHONPATH=$PP_RUN run_step "fewshot_$task" 40 "$RES/fewshot_$task.md" "$PY" "$REPO/benchmarks/real_fewshot.py" \
        --config "$FEWSHOT_CONFIG" --device "$DEV" --precision "$PREC" --data-seeds 0 --tune-seeds "$SEEDS" \
        --tasks "$task" --methods "$METHODS" --model-dir "$SMOL_DIR" --data-dir "$REPO/.data" --runs "$RES/runs"
    done
  else
    record fewshot skipped null 0 "no exported SmolLM2 (see smollm2_export.log)"
  fi
fi

# the same on the real model, with the MR task (after the few-shot runs, which reuse its export)
if has_step check_smol && [ -f "$SMOL_DIR/manifest.json" ]; then
  PYTHONPATH=$PP_RUN run_step check_smol 30 "$RES/check_smol.json" "$PY" -m bbt_onnx.cli check --model "$SMOL_DIR" \
    --task-file "$REPO/benchmarks/tasks/mr.json" --engines "$(if [ "$DEV" = cpu ]; then echo cpu:fp32,cpu:fp16; \
    else echo cpu:fp32,cuda:fp32,cuda:fp16; fi)" $THREADS --json
fi

# the project's own cross-engine check (`bbt-onnx check`), when this checkout has it
if has_step check && have_large check; then
  if PYTHONPATH=$PP_RUN "$PY" -m bbt_onnx.cli check --help > /dev/null 2>&1; then
    PYTHONPATH=$PP_RUN run_step check 30 "$RES/check.json" "$PY" -m bbt_onnx.cli check --model "$LARGE" --task sst2 \
      --engines "$(if [ "$DEV" = cpu ]; then echo cpu:fp32,cpu:fp16; else echo cpu:fp32,cuda:fp32,cuda:fp16; fi)" $THREADS --json
  else
    record check skipped null 0 "this checkout has no bbt-onnx check command"
  fi
fi
exit 0
