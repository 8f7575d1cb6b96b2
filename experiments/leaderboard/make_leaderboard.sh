#!/usr/bin/env bash
# Regenerate experiments/leaderboard/leaderboard.{md,csv,html} from this repository's own runs (one command):
#   bash experiments/leaderboard/make_leaderboard.sh            # after `make demo`
# Scores the newest demo run (outputs/train/edm_digits) with two samplers unless its records exist
# (eval-leaderboard-<sampler>.json beside the checkpoint), then ranks every record under outputs/ (the demo and
# any reproduction run, e.g. `lightning-diff train experiment=<preset>` + `lightning-diff evaluate`); writes the
# tables, the page and the Pareto figures (leaderboard-group<i>-<axis>.png) into experiments/leaderboard/.
# Settings through the environment: PY (python), NUM_IMAGES (FID images per seed set; 256 on a CPU),
# SAMPLERS (space-separated), RUNS (leaderboard inputs, comma-separated).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
NUM_IMAGES=${NUM_IMAGES:-256}
SAMPLERS=${SAMPLERS:-heun euler}
RUNS=${RUNS:-outputs}
ckpt=$(ls -t outputs/train/edm_digits/*/checkpoints/last.ckpt 2>/dev/null | head -n 1 || true)
if [ -z "$ckpt" ]; then
  echo "no demo run under outputs/train/edm_digits: run \`make demo\` first" >&2
  exit 1
fi
for sampler in $SAMPLERS; do
  if [ ! -f "$(dirname "$ckpt")/eval-leaderboard-$sampler.json" ]; then
    "$PY" -m lightning_diff evaluate "ckpt=$ckpt" "sampler=$sampler" "metrics=[fid,kid]" \
      "metrics.num_samples=$NUM_IMAGES" "metrics.kid.subset_size=$((NUM_IMAGES < 100 ? NUM_IMAGES : 100))" \
      progress=false "name=leaderboard-$sampler"
  fi
done
"$PY" -m lightning_diff leaderboard "runs=[$RUNS]" out=experiments/leaderboard \
  "title='lightning_diff: runs of this repository'"
