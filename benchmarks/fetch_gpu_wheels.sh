#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on an offline GPU machine with Python 3.12 (run here, with network):
#
#   * outputs/gpu_wheels/ ($GPU_WHEELS): cp312 manylinux x86_64 wheels of zarr and numcodecs (the versions of this
#     checkout's .venv) and tensorboard (the run logs write TensorBoard events), with every dependency except the
#     ones the GPU machine has already (numpy, pillow, setuptools: $GPU_WHEELS_EXCLUDE); with WITH_S3=1 also s3fs
#     and its dependencies (about 20 MB more; the check itself reads no S3);
#   * outputs/gpu_data/fashion-mnist/ ($GPU_DATA): the first 4096 train and 1024 test Fashion-MNIST images and
#     labels, for the tiny pipeline's evaluation (section b) when the machine has no copy of the data set.
#
# Both are ignored by git; carry them to the device:  run(carry=["outputs/gpu_wheels", "outputs/gpu_data"], ...).
# Fails when the total exceeds $GPU_CARRY_MAX_MB (default 40; the device's carry limit is 64 MiB in all).
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
cd "$HERE"
VENV_PY=${VENV_PY:-.venv/bin/python}
WHEELS=${GPU_WHEELS:-outputs/gpu_wheels}
DATA=${GPU_DATA:-outputs/gpu_data}
EXCLUDE=${GPU_WHEELS_EXCLUDE:-numpy pillow setuptools}
MAX_MB=${GPU_CARRY_MAX_MB:-40}
FMNIST=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}

version() { "$VENV_PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }
packages=("zarr==$(version zarr)" "numcodecs==$(version numcodecs)" "tensorboard==$(version tensorboard)")
if [ "${WITH_S3:-0}" = 1 ]; then
  packages+=("s3fs==$(version s3fs)")
fi
for p in "${packages[@]}"; do
  case $p in *==) echo "$p: not installed in $VENV_PY's environment" >&2; exit 1 ;; esac
done

rm -rf "$WHEELS"
mkdir -p "$WHEELS"
echo "downloading ${packages[*]} (+ dependencies) for cp312 manylinux x86_64 into $WHEELS ..." >&2
"$VENV_PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$WHEELS" "${packages[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
for name in $EXCLUDE; do
  rm -f "$WHEELS/$name"-*.whl
done

mkdir -p "$DATA/fashion-mnist"
"$VENV_PY" - "$FMNIST" "$DATA/fashion-mnist" <<'EOF'
"""Copy the first records of Fashion-MNIST's IDX files (header count rewritten), gzip-compressed."""
import gzip
import struct
import sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
for prefix, n in (("train", 4096), ("t10k", 1024)):
    for kind, header in (("images-idx3", 16), ("labels-idx1", 8)):
        name = f"{prefix}-{kind}-ubyte.gz"
        raw = gzip.decompress((src / name).read_bytes())
        dims = struct.unpack(">" + "I" * (header // 4 - 1), raw[4:header])
        record = 1
        for d in dims[1:]:
            record *= d
        out = raw[:4] + struct.pack(">I", n) + raw[8:header] + raw[header : header + n * record]
        (dst / name).write_bytes(gzip.compress(out, 6))
print(f"wrote {dst}: 4096 train + 1024 test images with labels", file=sys.stderr)
EOF

ls -1 "$WHEELS" >&2
total_kb=$(du -sk "$WHEELS" "$DATA" | awk '{s += $1} END {print s}')
echo "carry total: $((total_kb / 1024)) MB ($WHEELS + $DATA; limit here $MAX_MB MB)" >&2
if [ $((total_kb / 1024)) -gt "$MAX_MB" ]; then
  echo "too large for the device's carry: exclude more packages (GPU_WHEELS_EXCLUDE) or drop WITH_S3" >&2
  exit 1
fi
