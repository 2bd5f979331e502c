#!/usr/bin/env bash
# The larger phantom run (configs/phantom-512.yaml) on a GPU host; packs the results into $OUT.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
RUN=/tmp/phantom-512
nvidia-smi -L | tee "$OUT/device.txt"
t0=$SECONDS
timeout ${RUN_LIMIT:-420} python3 -m mammo_sae run configs/phantom-512.yaml --out $RUN --no-progress 2>&1 | tee "$OUT/run.log"
echo "wall $((SECONDS - t0)) s" | tee -a "$OUT/run.log"
# Small artefacts only (the stores and SAE stay behind): tables, JSON, figures, the report page.
(cd $RUN && find . -path ./stores -prune -o -path ./data/images_png -prune -o \( -name '*.csv' -o -name '*.json' -o -name '*.jsonl' -o -name '*.yaml' -o -name '*.html' -o -name '*.css' \) -print \
  | grep -v '/latents/' | tar -czf "$OUT/phantom512.tgz" -T -)
ls -la "$OUT"
