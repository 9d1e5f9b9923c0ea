#!/usr/bin/env bash
# The main job end to end on embedded defaults: synthetic `small` two-domain data, CCTL and the
# target-only DNN trained on 2 CPU ranks through torchx (gloo), then the result table.
# Needs the virtualenv's bin on PATH (the Makefile's `demo` target does that).
set -euo pipefail
DATA=${DATA:-data/small}
RUNS=${RUNS:-runs/demo}
PRESET=${PRESET:-small}
cctl-rec datagen --preset "$PRESET" --out "$DATA" --workers 2
for model in cctl dnn; do
  rm -rf "$RUNS/$model"
  torchx run -s local_cwd --log launch/components.py:train --j 1x2 --config "configs/${model}_small.yaml" \
    --data "$DATA" --run_dir "$RUNS/$model" 2>&1 | grep -E "done:|rror|FAILED|SUCCEEDED" || true
  test -f "$RUNS/$model/metrics.json" || { echo "training $model failed; rerun the torchx line above to see its log" >&2; exit 1; }
done
echo
echo "Target test AUC of the served (pure) tower, 2 gloo ranks, one pass over $DATA:"
cctl-rec eval "$RUNS/dnn" "$RUNS/cctl"
