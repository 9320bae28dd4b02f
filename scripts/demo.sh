#!/usr/bin/env bash
# The main job end to end on real photos: train the default recipe, see its evaluation once, see a few right and
# a few wrong answers (with "not sure" where the model is), and find the report, the predictions and the web page.
# Extra arguments go to `pomona train` (e.g. `bash scripts/demo.sh --epochs 1 --img-size 64` for a quick look);
# RUN=folder picks the run folder (default runs/grocery).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=../shared/data/grocery-apples
if [ ! -d "$DATA/train" ]; then
  DATA=$(pomona data fetch grocery-apples | tail -n 1)   # public GroceryStoreDataset apples (MIT licence)
fi
RUN=${RUN:-runs/grocery}

# The validation photos are drawn from train/ as whole near-duplicate groups (--group-by auto: photos of one
# shelf session stay on one side), so the one table train prints, with its CI over groups, estimates photos of
# sessions the model never saw. The run keeps its last epoch, so nothing is selected on them. --overwrite: a rerun
# replaces its own run.
pomona train --data "$DATA/train" --out "$RUN" --overwrite "$@"

# val/ holds 22 photos of shelves train/ does not show at all: predicted as you would predict your own photos.
# A CSV (with the "not sure" verdict) and each photo with its answer drawn on it.
pomona predict "$RUN" --data "$DATA/val" --out "$RUN/predictions.csv" --save-dir "$RUN/predicted"

python - "$RUN/predictions.csv" <<'EOF'
import sys
from pathlib import Path

import pandas as pd

p = pd.read_csv(sys.argv[1], keep_default_na=False)
p = p[p["error"] == ""].assign(true=[Path(x).parent.name for x in p["path"]], photo=[Path(x).name for x in p["path"]])
right, wrong = p[p["label"] == p["true"]], p[p["label"] != p["true"]]


def show(title, rows):
    print(f"\n{title}")
    for r in rows.itertuples():
        top = "  ".join(f"{getattr(r, c)} {getattr(r, q):.0%}" for c, q in
                        [("label", "probability"), ("label_2", "probability_2"), ("label_3", "probability_3")]
                        if c in p and getattr(r, c) != "")
        print(f"  {r.photo:26.26s} true {r.true:18s} answer {r.verdict:42s} {top}")


def few(rows):  # one photo per true variety, three at most
    return rows.groupby("true", sort=False).head(1).head(3)


show(f"right: {len(right)} of {len(p)} photos, e.g.", few(right))
show(f"wrong: {len(wrong)} of {len(p)} photos, e.g.", few(wrong))
EOF

cat <<EOF

Done.
  report:       $RUN/report.html   (open it in a browser: results first, then training and data)
  predictions:  $RUN/predictions.csv and the photos with their answers drawn on them in $RUN/predicted/
  web page:     pomona serve $RUN   (then open http://127.0.0.1:8000)
EOF
