#!/usr/bin/env bash
# The CPU run of the paper's studies whose figures are in results/paper_cpu/RESULTS.md.
# Both studies run side by side, one CPU thread each (2-core machine), time-boxed, with two
# MobileNet v2 configurations (the paper's best backbone) queued as never-pruned references;
# then the report (ours beside the paper) and the shortcut diagnostics with the lung-blanked
# control run of each study's best trial.
# Usage: bash results/paper_cpu/run.sh [SEARCH_SECONDS]   (from the repository root, after
# `make install`; data from ../shared/data is prepared into $AUTOML_CXR_DATA or ./data)
set -euo pipefail
SECONDS_BOX=${1:-4200}
BIN=${BIN:-.venv/bin}
OUT=results/paper_cpu
DATA=${AUTOML_CXR_DATA:-data}

"$BIN/automl-cxr" data prepare --data-dir "$DATA" --recipe three_class --recipe four_class
for d in three_class four_class; do
  "$BIN/automl-cxr" search --dataset "$d" --space "studies/paper_$d.yaml" --profile paper-cpu \
    --trials 40 --timeout "$SECONDS_BOX" --cpus-per-trial 1 --data-dir "$DATA" \
    --enqueue backbone=mobilenetv2_100,frozen_fraction=0.875,head=linear,lr=0.002 \
    --enqueue backbone=mobilenetv2_100,frozen_fraction=0.75,head=linear,lr=0.002 \
    --storage "$OUT/$d.db" > "$OUT/$d.search.log" 2>&1 &
done
wait
for d in three_class four_class; do
  mkdir -p "$OUT/$d"
  COLUMNS=160 "$BIN/automl-cxr" report "$OUT/$d.db" --out "$OUT/$d" --no-html > "$OUT/$d/report.txt" 2>&1
  OMP_NUM_THREADS=1 COLUMNS=160 "$BIN/automl-cxr" diagnose --study "$OUT/$d.db" \
    --data-dir "$DATA" --control --quiet > "$OUT/$d/diagnose.txt" 2>&1 &
done
wait
