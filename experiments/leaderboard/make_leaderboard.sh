#!/usr/bin/env bash
# Regenerate experiments/leaderboard/leaderboard.{md,csv,html} from this repository's own runs (one command):
#   bash experiments/leaderboard/make_leaderboard.sh            # after `make demo`
# Scores the newest demo run (outputs/train/edm_digits_fast) with two samplers unless its records exist
# (eval-leaderboard-<sampler>.json beside the checkpoint), copies every record under outputs/ (the demo, the
# experiments' and reproductions' runs, any `lightning-diff evaluate`) into experiments/leaderboard/records/ (committed:
# a clone without outputs/ rebuilds the same board; a folder of outputs/ replaces its copy whole, so a retrained run's
# old records do not survive), then ranks those records; writes the tables, the page and the Pareto figures
# (leaderboard-group<i>-<axis>.png) into experiments/leaderboard/.
# Settings through the environment: PY (python), NUM_IMAGES (FID images per seed set; 256 on a CPU),
# SAMPLERS (space-separated), RUNS (leaderboard inputs, comma-separated; default the records folder).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
NUM_IMAGES=${NUM_IMAGES:-256}
SAMPLERS=${SAMPLERS:-heun euler}
RECORDS=experiments/leaderboard/records
RUNS=${RUNS:-$RECORDS}
ckpt=$(ls -t outputs/train/edm_digits_fast/*/checkpoints/last.ckpt 2>/dev/null | head -n 1 || true)
if [ -z "$ckpt" ]; then
  echo "no demo run under outputs/train/edm_digits_fast: run \`make demo\` first" >&2
  exit 1
fi
for sampler in $SAMPLERS; do
  if [ ! -f "$(dirname "$ckpt")/eval-leaderboard-$sampler.json" ]; then
    "$PY" -m lightning_diff evaluate "ckpt=$ckpt" "sampler=$sampler" "metrics=[fid,kid]" \
      "metrics.num_samples=$NUM_IMAGES" "metrics.kid.subset_size=$((NUM_IMAGES < 100 ? NUM_IMAGES : 100))" \
      progress=false "name=leaderboard-$sampler"
  fi
done
find outputs -name 'eval-*.json' -printf '%h\n' | sort -u | while IFS= read -r folder; do
  copy="$RECORDS/${folder#outputs/}"
  rm -rf "$copy" && mkdir -p "$copy" && cp "$folder"/eval-*.json "$copy"/
done
"$PY" -m lightning_diff leaderboard "runs=[$RUNS]" out=experiments/leaderboard \
  "title='lightning_diff: runs of this repository'"
