#!/usr/bin/env bash
# One GPU session: CUDA correctness tests, then the GPU benchmarks. Writes logs to $OUT (or ./gpu_out).
# Run from the repo root on a CUDA host:  bash benchmarks/gpu_session.sh
# MAMMO_SAE_SHARED may point at a copy of ../shared (the B2 fixture) for the parity test.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
step() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS; "$@" 2>&1 | tee "$OUT/$name.txt"; echo "=== $name done in $((SECONDS - t0)) s (rc ${PIPESTATUS[0]})"; }
step gpu_tests $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_localize_pipeline.py
step sae_train timeout 240 $PY benchmarks/sae_train.py --configs tiny,small,mammo --steps 30 --warmup 3 --compile
step encoder_speed timeout 120 $PY benchmarks/encoder_speed.py --device cuda --cases b5,b2,phantom --variants fp32,fp32-cl,bf16-cl --iters 10 --warmup 2 --no-phantom-train
step extract_speed timeout 150 $PY benchmarks/extract_speed.py --arch efficientnet-b5 --image-size 1520x912 --n-images 256 --batch-size 8 --workers 8 --dtype float16 --device cuda
