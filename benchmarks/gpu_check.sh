#!/usr/bin/env bash
# One GPU check of the project: benchmarks/gpu_check.sh OUTDIR [gpu_check.py options, e.g. --quick]
#
# 1. installs the carried wheels (zarr, numcodecs, tensorboard; s3fs when present) from $GPU_WHEELS
#    (default outputs/gpu_wheels, made by benchmarks/fetch_gpu_wheels.sh), offline, each group only when it is not
#    importable already;
# 2. runs benchmarks/gpu_check.py OUTDIR with PYTHONPATH=. (the project is not installed), under an overall
#    timeout ($GPU_CHECK_TIMEOUT_S, default 460 s) so the whole command stays within 8 minutes.
# Writes OUTDIR/gpu_check.json, OUTDIR/gpu_check.log (the check's log) and OUTDIR/gpu_check_console.log (this
# script's output, install included). Python: $PYTHON (default python3).
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 OUTDIR [gpu_check.py options]" >&2
  exit 2
fi
OUTDIR=$1
shift
HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-outputs/gpu_wheels}
mkdir -p "$OUTDIR"
CONSOLE="$OUTDIR/gpu_check_console.log"
: >"$CONSOLE"
started=$(date +%s)

note() { echo "$*" | tee -a "$CONSOLE" >&2; }

importable() { "$PYTHON" -c "import $1" >/dev/null 2>&1; }

install_group() {  # install_group LABEL MODULE PACKAGE...
  local label=$1 module=$2
  shift 2
  if importable "$module"; then
    note "wheels: $label already importable, not installed"
    return 0
  fi
  if [ ! -d "$WHEELS" ]; then
    note "wheels: $label missing and no wheel folder $WHEELS (run benchmarks/fetch_gpu_wheels.sh, carry it)"
    return 1
  fi
  # PIP_BREAK_SYSTEM_PACKAGES: an "externally managed" system Python would refuse otherwise (old pips ignore it)
  if PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" "$@" \
      >>"$CONSOLE" 2>&1 ||
     PIP_BREAK_SYSTEM_PACKAGES=1 "$PYTHON" -m pip install -q --user --no-index --find-links "$WHEELS" "$@" \
      >>"$CONSOLE" 2>&1; then
    note "wheels: installed $label from $WHEELS"
  else
    note "wheels: installing $label from $WHEELS FAILED (see $CONSOLE)"
    return 1
  fi
}

install_group "zarr + numcodecs" "zarr, numcodecs" zarr numcodecs || note "the check will fail without zarr"
install_group "tensorboard" "tensorboard" tensorboard || note "run logs (TensorBoard events) of (b) will fail"
if ls "$WHEELS"/s3fs-*.whl >/dev/null 2>&1; then
  install_group "s3fs" "s3fs" s3fs || true
fi
note "install took $(( $(date +%s) - started )) s"

"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" 2>&1 | tee -a "$CONSOLE" >&2

export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
timeout --signal=TERM --kill-after=10 "${GPU_CHECK_TIMEOUT_S:-460}" \
  "$PYTHON" benchmarks/gpu_check.py "$OUTDIR" "$@" 2>&1 | tee -a "$CONSOLE"
rc=${PIPESTATUS[0]}
note "gpu_check.py exit code $rc; whole command $(( $(date +%s) - started )) s"
if [ -f "$OUTDIR/gpu_check.json" ]; then
  "$PYTHON" - "$OUTDIR/gpu_check.json" <<'EOF' | tee -a "$CONSOLE"
import json, sys
d = json.load(open(sys.argv[1]))
print("summary:", d["machine"]["label"], {k: v.get("status") for k, v in d["sections"].items()},
      "ray imported:", d.get("ray_imported"))
EOF
fi
exit "$rc"
