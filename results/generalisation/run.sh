#!/usr/bin/env bash
# The CPU run behind results/generalisation/RESULTS.md (2 cores, no GPU). From the repo root:
#   bash results/generalisation/run.sh [SOURCES]      (default: ../shared/data)
# 1. held-out external sets (whole Cohen sites + a quarter of NIH's patients), drawn by seed;
# 2. the recipes prepared WITHOUT those images (and their patients);
# 3. one `cpu`-profile study per (recipe, --cv) on space.yaml (last stage or head only), every COMPLETE trial scored on the external
#    sets (never seen by the sampler, the pruner or the ranking);
# 4. the report of each study (leaderboard with external columns, generalisation-gap figure).
set -euo pipefail
cd "$(dirname "$0")/../.."
SOURCES=${1:-../shared/data}
OUT=results/generalisation
DATA=${DATA_DIR:-data/generalisation}
TRIALS=${TRIALS:-30}
TIMEOUT=${TIMEOUT:-600}
SPACE=$OUT/space.yaml
EXT=$OUT/external
python results/generalisation/make_external.py "$SOURCES" "$EXT" --seed 0
automl-cxr data prepare --sources "$SOURCES" --data-dir "$DATA" --quiet \
  --exclude "$EXT/adult_holdout_binary.csv" --exclude "$EXT/adult_holdout_four.csv"
run() {  # recipe cv external-family
  local recipe=$1 cv=$2 fam=$3
  local db=$OUT/${recipe}_${cv}.db
  echo "== $recipe --cv $cv ($(date -u +%H:%M:%S))"
  automl-cxr search --dataset "$recipe" --cv "$cv" --profile cpu --space "$SPACE" \
    --trials "$TRIALS" --timeout "$TIMEOUT" --data-dir "$DATA" --storage "$db" \
    --external "$EXT/adult_holdout_$fam.csv" --external "$EXT/cohen_sites_$fam.csv" \
    --external "$EXT/nih_holdout_$fam.csv" --quiet 2>&1 | tee "$OUT/${recipe}_${cv}.search.log"
  automl-cxr report "$db" --out "$OUT/report_${recipe}_${cv}" > "$OUT/report_${recipe}_${cv}.txt" 2>&1 || true
}
for cv in patient; do run binary "$cv" binary; done
for cv in patient site; do run binary_adult "$cv" binary; done
for cv in patient site; do run four_class_mixed "$cv" four; done
automl-cxr data info binary --data-dir "$DATA" --json > "$OUT/info_binary.json"
automl-cxr data info binary_adult --data-dir "$DATA" --json > "$OUT/info_binary_adult.json"
automl-cxr data info four_class_mixed --data-dir "$DATA" --json > "$OUT/info_four_class_mixed.json"
echo "done $(date -u +%H:%M:%S)"
