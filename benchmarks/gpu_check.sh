#!/usr/bin/env bash
# One-GPU check of zp-compile, in this order, each part within what is left of a 440 s budget:
#   numerics   optimized vs unmodified logits on the device, Qwen3-MoE and GPT-OSS, fp32 and bf16;
#   sweep      tokens/s and MFU of the compiled per-rank forward of a Qwen3-30B-A3B-shaped stack of 4
#              layers (random bf16 weights) around T*, against transformers' eager forward and stock
#              torch.compile of the unmodified model;
#   asyncep    the sharded graph of a world of 8 on this one GPU, each gather a side-stream copy of 7/8
#              of the bank, against the same graph without: the overlap cost (benchmarks/asyncep_one_gpu.py);
#   packed     packed attention: FlexAttention vs the per-row loop vs one padded SDPA (benchmarks/packed_attention.py).
#   ranks      with >= 2 GPUs: benchmarks/throughput.py under torchrun, NCCL, AsyncEP vs TP vs EP vs a replica
#              (one GPU: skipped; the dry run: 2 CPU ranks over gloo).
# Prints a table, writes $OUT/gpu_check.json (./gpu_check.json when OUT is unset). Details:
# benchmarks/gpu_check.py and benchmarks/gpu_phases.py. Not yet run on a GPU: written for one and
# dry-run on CPU in the test suite (tests/test_gpu_check.py).
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from the repo root (or anywhere)
#   bash benchmarks/gpu_check.sh --dry-run   # same code path on CPU, tiny config, < 60 s
#   bash benchmarks/gpu_check.sh --iters 10  # any other flag goes to gpu_check.py
#
# Dependencies. torch is used as found (the GPU machine's is a CUDA build; it is never reinstalled:
# zp_compile pins torch>=2.13, gpu_check.py bridges the one API an older torch lacks). The package is
# used from the working tree through PYTHONPATH, not `pip install -e .`, which would try to replace that
# torch. transformers>=5.24, accelerate>=1.10 and safetensors>=0.6 are checked; if one is unmet, the
# wheels in .whl/ (repo root) are installed into a private folder put first on PYTHONPATH; with no .whl/,
# pip tries the package index (the GPU machine reaches none), else the script stops and says what to fetch.
#
# The GPU machine has transformers 5.17 (too old), accelerate 1.15 and safetensors 0.8 (fine), and no
# network, so transformers travels as a wheel. Prepare it ONCE on the development machine, in the repo root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl transformers==5.24.0 regex==2026.5.9
#
# (transformers 5.24 needs regex>=2025.10.22, which the GPU image may lack; the regex wheel is ~0.8 MB,
# transformers ~13 MB.) Then run it through the device tool with .whl carried:
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -euo pipefail

export ZP_GPU_CHECK_START="${ZP_GPU_CHECK_START:-$(date +%s)}"  # gpu_check.py's budget counts from here
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # repo root
ROOT="$PWD"
PY="${PYTHON:-python3}"
SITE="${ZP_GPU_CHECK_SITE:-/tmp/zp-gpu-check-site}"
WHEELS="${ZP_GPU_CHECK_WHEELS:-.whl}"  # folder of wheels to install from when a requirement is unmet
export PYTHONUNBUFFERED=1

args=()
dry=0
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then dry=1; else args+=("$a"); fi
done
if (( dry )); then args=(--device cpu --tiny "${args[@]}"); fi

log() { echo "[gpu_check.sh +$(( $(date +%s) - ZP_GPU_CHECK_START ))s] $*"; }
die() { echo "[gpu_check.sh] ERROR: $*" >&2; exit 2; }

command -v "$PY" >/dev/null || die "$PY not found (set PYTHON=...)"
# torch: present, and a CUDA build that sees a GPU unless this is a dry run. Never installed here.
"$PY" - "$dry" <<'EOF' || die "torch check failed (see above); this script does not install torch"
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"torch is not importable: {e}")
cuda = torch.cuda.is_available()
print(f"torch {torch.__version__} (CUDA build {torch.version.cuda}), GPU visible: {cuda}"
      + (f", {torch.cuda.get_device_name(0)}" if cuda else ""))
if sys.argv[1] == "0" and not cuda:
    sys.exit("no GPU visible to torch; for a CPU dry run use --dry-run")
EOF

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
check() { "$PY" benchmarks/gpu_check.py --check-deps; }
missing="$(check)" || die "dependency check failed"
if [[ -n "$missing" ]]; then
  log "unmet: $(echo "$missing" | paste -sd ';' -)"
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  rm -rf "$SITE"
  if (( ${#wheels[@]} )); then
    log "installing ${#wheels[@]} wheel(s) from $WHEELS/ into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
      || die "pip could not install $WHEELS/*.whl (python $("$PY" -c 'import sys; print(sys.version.split()[0])'); the wheels must be cp312 manylinux x86_64 or py3-none-any)"
  else
    # Only the unmet packages, without their dependencies: pip --target would otherwise pull a second torch.
    specs=()
    while IFS= read -r line; do specs+=("${line%% (*}"); done <<< "$missing"
    log "no wheels in $WHEELS/: trying the package index for ${specs[*]} (60 s)"
    timeout 90 "$PY" -m pip install -q --no-deps --no-compile --timeout 20 --retries 1 --target "$SITE" "${specs[@]}" \
      || die "unmet: $missing; no wheels in $WHEELS/ and the package index is unreachable. Fetch the wheels as the comment at the top of benchmarks/gpu_check.sh says, and carry .whl"
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  missing="$(check)" || die "dependency check failed after installing"
  [[ -z "$missing" ]] || die "still unmet after installing: $missing"
  # Import for real: transformers checks its own dependencies' versions (regex, tokenizers, huggingface-hub) at import.
  "$PY" -c "import transformers, accelerate, safetensors; print('transformers', transformers.__version__, 'from', transformers.__file__)" \
    || die "transformers does not import with the installed wheels; add the packages the error names to .whl (pip download command at the top of this script)"
fi

log "running benchmarks/gpu_check.py ${args[*]}"
# The Python side keeps its own budget (--budget-s, 440 s from the start of this script) and reports what
# it has when it runs out; this timeout is the backstop should it hang where its watchdog cannot act.
status=0
if [[ -n "${OUT:-}" ]]; then  # the device tool brings $OUT back: keep the whole log there too
  timeout -k 10 470 "$PY" benchmarks/gpu_check.py "${args[@]}" 2>&1 | tee "$OUT/gpu_check.log" || status=${PIPESTATUS[0]}
else
  timeout -k 10 470 "$PY" benchmarks/gpu_check.py "${args[@]}" || status=$?
fi
log "done (exit $status)"
exit "$status"
