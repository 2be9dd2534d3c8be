#!/usr/bin/env bash
# The EDM2 reference client end to end on the CPU, in minutes: train Config G (digits8
# preset) on scikit-learn's 8x8 digits while phema streams EMA snapshots, reconstruct a
# sweep of EMA lengths after training, sample from each, and print quality per EMA length.
# The commands after the install are the ones README.md lists; rerunning resumes and
# replaces the outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh edm2
source scripts/env.sh 2>/dev/null
python() { "$PY" "$@"; }  # the interpreter install.sh installed into
python -m edm2_reference.train --preset digits8 --outdir runs/digits8 --duration 64Ki --snapshot 4Ki
phema plan runs/digits8/snapshots --std 0.02,0.04,0.07,0.10,0.15,0.20
phema reconstruct runs/digits8/snapshots --std 0.02,0.04,0.07,0.10,0.15,0.20 --out runs/digits8/ema --overwrite
python -m edm2_reference.sample --net runs/digits8/ema/phema-ema-000000065536-0.0700.safetensors --seeds 0-63 --out runs/digits8/samples-std0.07.png --overwrite
python -m edm2_reference.evaluate runs/digits8/ema --n 500 --net "raw weights=runs/digits8/training-state-000000065536.pt" --classifier runs/digits8/classifier.safetensors
