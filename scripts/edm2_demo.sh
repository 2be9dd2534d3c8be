#!/usr/bin/env bash
# The EDM2 reference client end to end on the CPU, in minutes: train Config G (digits8
# preset) on scikit-learn's 8x8 digits while phema streams EMA snapshots, reconstruct a
# sweep of EMA lengths after training, sample from each, and print quality per EMA length.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh edm2
RUN="${RUN:-runs/digits8}"
python3 -m edm2_reference.train --preset digits8 --outdir "$RUN" --duration 64Ki --snapshot 4Ki
phema plan "$RUN/snapshots" --std 0.02,0.04,0.07,0.10,0.15,0.20
phema reconstruct "$RUN/snapshots" --std 0.02,0.04,0.07,0.10,0.15,0.20 --out "$RUN/ema" --overwrite
python3 -m edm2_reference.sample --net "$RUN/ema/phema-ema-000000065536-0.0700.safetensors" \
  --seeds 0-63 --out "$RUN/samples-std0.07.png" --overwrite
python3 -m edm2_reference.evaluate "$RUN/ema" --n 500 \
  --net "raw weights=$RUN/training-state-000000065536.pt" --classifier "$RUN/classifier.safetensors"
