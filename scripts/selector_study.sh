#!/usr/bin/env bash
# The issue-9/10 study on `small`: target-only DNN vs CCTL with each selector mode, 2 gloo ranks
# through torchx, one pass over the target train split; then the result table.
# Usage: scripts/selector_study.sh [DATA] [OUT] [SEEDS] [ONLY]   (needs the venv's bin on PATH)
# ONLY: an extended regex of run names to run (default: all).
set -euo pipefail
DATA=${1:-data/small}
OUT=${2:-runs/study}
SEEDS=${3:-"0 1"}
ONLY=${4:-.}
run() {  # name, then config overrides
  local name=$1; shift
  [[ $name =~ $ONLY ]] || return 0
  for seed in $SEEDS; do
    local dir="$OUT/$name-s$seed"
    [ -f "$dir/metrics.json" ] && continue
    torchx run -s local_cwd --log launch/components.py:train --j 1x2 --config configs/cctl_small.yaml \
      --data "$DATA" --run_dir "$dir" -- run.seed="$seed" "$@" 2>&1 | grep -E "done:|rror" || true
    test -f "$dir/metrics.json" || { echo "run $dir failed" >&2; exit 1; }
  done
}
run dnn model.name=dnn
run cctl-paper selector.mode=paper
run cctl-bernoulli-ema selector.mode=bernoulli selector.ema_baseline=0.9
run cctl-fixed selector.mode=fixed
run cctl-oracle selector.mode=oracle
run cctl-influence selector.mode=influence
run shared-fixed selector.mode=fixed model.share_ids=true ren.enabled=false
run shared-oracle selector.mode=oracle model.share_ids=true ren.enabled=false
run shared-paper selector.mode=paper model.share_ids=true ren.enabled=false
run shared-influence selector.mode=influence model.share_ids=true ren.enabled=false
cctl-rec eval "$OUT"/*
