#!/usr/bin/env bash
# The CPU run behind results/generalisation/ROBUST.md (issue 23; 2 cores, no GPU). From the repo
# root, after results/generalisation/run.sh has drawn the external sets:
#   bash results/generalisation/robust/run.sh [SOURCES]      (default: ../shared/data)
# 1. the recipes prepared without the external sets' images and patients (as run.sh does);
# 2. the lung segmenter trained without them either (`lungs train --exclude`);
# 3. binary_adult --cv site studies: no lever (space.yaml, as in RESULTS.md), each lever alone,
#    all three; and all three under --cv patient; same seed, trials and time budget (and, with
#    STUDIES=resolution TIMEOUT=2400, space_resolution.yaml: input size and Lite2; with
#    STUDIES=lite2, space_lite2.yaml: Lite2 as a fourth backbone at 128 px; with
#    STUDIES="dro none_rerun robust_dro": group DRO alone, the no-lever baseline again on the
#    same data, and all five levers); every
#    COMPLETE trial scored on the external sets (never seen by sampler, pruner or ranking);
# 4. summarise.py writes the tables of ROBUST.md (summary.md/json).
set -euo pipefail
cd "$(dirname "$0")/../../.."
SOURCES=${1:-../shared/data}
GEN=results/generalisation
OUT=$GEN/robust
DATA=${DATA_DIR:-data/generalisation}
TRIALS=${TRIALS:-30}
TIMEOUT=${TIMEOUT:-900}
EXT=$GEN/external
[ -f "$EXT/adult_holdout_binary.csv" ] || python $GEN/make_external.py "$SOURCES" "$EXT" --seed 0
automl-cxr data prepare --sources "$SOURCES" --data-dir "$DATA" --quiet \
  --exclude "$EXT/adult_holdout_binary.csv" --exclude "$EXT/adult_holdout_four.csv"
[ -f "$DATA/lungs/segmenter.pt" ] || automl-cxr lungs train --sources "$SOURCES" --data-dir "$DATA" \
  --exclude "$EXT/adult_holdout_binary.csv" --quiet | tee "$OUT/lungs_train.txt"
automl-cxr lungs info --data-dir "$DATA" > "$OUT/segmenter.json"
run() {  # name space cv
  local name=$1 space=$2 cv=$3
  local db=$OUT/$name.db
  echo "== $name ($(date -u +%H:%M:%S))"
  local t0=$(date +%s)
  automl-cxr search --dataset binary_adult --cv "$cv" --profile cpu --space "$space" \
    --trials "$TRIALS" --timeout "$TIMEOUT" --data-dir "$DATA" --storage "$db" \
    --external "$EXT/adult_holdout_binary.csv" --external "$EXT/cohen_sites_binary.csv" \
    --external "$EXT/nih_holdout_binary.csv" --quiet 2>&1 | tee "$OUT/$name.search.log"
  echo "wall_seconds $(( $(date +%s) - t0 ))" | tee -a "$OUT/$name.search.log"
}
for study in ${STUDIES:-none roi intensity adversarial robust robust_patient}; do
  case $study in
    none) run none_site "$GEN/space.yaml" site ;;
    none_rerun) run none_rerun_site "$GEN/space.yaml" site ;;  # the baseline on today's data
    robust_patient) run robust_patient "$OUT/space_robust.yaml" patient ;;
    *) run "${study}_site" "$OUT/space_$study.yaml" site ;;
  esac
done
python $OUT/summarise.py
echo "done $(date -u +%H:%M:%S)"
