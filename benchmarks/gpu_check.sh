#!/usr/bin/env bash
# One-shot GPU check: fixture goldens on CUDA (fp32/bf16), real OOM recovery, `embindex build` with whole and
# fractional GPUs, throughput and MFU, faiss-gpu training, generative-stage tokens/s; one report.
#
#   bash benchmarks/gpu_check.sh ARTIFACT_DIR
#
# Writes ARTIFACT_DIR/report.json, ARTIFACT_DIR/report.md and ARTIFACT_DIR/nvidia-smi.txt. Needs this
# repository with its venv (a CUDA torch; faiss-gpu optional); no network. The work is done by
# benchmarks/gpu_check.py (see its docstring and docs/sizing.md, "One-shot GPU check").
#
# Environment:
#   GPU_CHECK_TIMEOUT  seconds for the whole run (default 480); the run is stopped after it
#   GPU_CHECK_ARGS     extra arguments for gpu_check.py, e.g. "--device cpu --quick" for a dry run without a GPU,
#                      or "--sections goldens,oom"
#   PYTHON             the interpreter (default: the repository's .venv/bin/python)
# Exit code: gpu_check.py's (0 all sections ok or skipped, 1 a section failed, 2 no CUDA device), 124 on timeout.
set -euo pipefail

if [[ $# -ne 1 || -z "${1:-}" ]]; then
    echo "usage: $0 ARTIFACT_DIR" >&2
    exit 2
fi
OUT=$1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
TIMEOUT=${GPU_CHECK_TIMEOUT:-480}
read -r -a EXTRA <<< "${GPU_CHECK_ARGS:-}"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [[ ! -x $PY ]]; then
    echo "error: no Python at $PY (create the venv, or set PYTHON)" >&2
    exit 2
fi

if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "(nvidia-smi exited with $?)" >> "$OUT/nvidia-smi.txt"
else
    echo "nvidia-smi not found" > "$OUT/nvidia-smi.txt"
fi

export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
unset RAY_ADDRESS  # a private local Ray, never a cluster this shell happens to point at

cd "$ROOT"
rc=0
# At the deadline SIGTERM goes to gpu_check.py alone (--foreground: not to the Ray processes it started, which
# it shuts down itself after marking the running section in the report); SIGKILL 30 s later if it is still up.
timeout --foreground --signal=TERM --kill-after=30 "$TIMEOUT" \
    "$PY" benchmarks/gpu_check.py --out "$OUT" --budget-s "$((TIMEOUT - 30))" "${EXTRA[@]}" || rc=$?

if [[ $rc -eq 124 || $rc -eq 137 ]]; then
    echo "gpu_check: stopped after ${TIMEOUT}s (GPU_CHECK_TIMEOUT); report.json shows the section that did not finish" >&2
    printf '\n**Stopped after %ss** (GPU_CHECK_TIMEOUT): the section "stopped by a signal" (or still "running") did not finish.\n' \
        "$TIMEOUT" >> "$OUT/report.md"
fi
echo "gpu_check: exit $rc; report: $OUT/report.md ($OUT/report.json)" >&2
exit $rc
