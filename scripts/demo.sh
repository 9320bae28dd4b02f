#!/usr/bin/env bash
# The main job end to end on real photos: train, evaluate, predict a folder to CSV, and show one photo's top-3.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/grocery-apples
if [ ! -d "$DATA/train" ]; then
  DATA=$(pomona data fetch grocery-apples | tail -n 1)   # public GroceryStoreDataset apples (MIT licence)
fi
RUN=${RUN:-runs/grocery}
pomona train --data "$DATA/train" --val-data "$DATA/val" --out "$RUN" --overwrite "$@"   # rerunnable: replaces its own run
pomona evaluate "$RUN" --data "$DATA/val" --out "$RUN/eval"
pomona predict "$RUN" --data "$DATA/val" --out "$RUN/predictions.csv"
pomona predict "$RUN" "$(ls "$DATA"/val/Granny-Smith/* | head -n 1)" "$(ls "$DATA"/val/Pink-Lady/* | head -n 1)"
echo "Done: $RUN/eval/metrics.json, $RUN/eval/confusion_matrix.png, $RUN/predictions.csv"
