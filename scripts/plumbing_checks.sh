#!/usr/bin/env bash
# Issue 9's plumbing checks on `small`, 2 gloo ranks through torchx:
# (1) the selector fitted to the ground-truth is_harmful flag separates harmful from clean rows
#     (its inputs, the SAN-aligned source representation, can identify harm);
# (2) with fixed policies (all weights 1 vs weight 1 on clean rows only) and a held-out reward,
#     compare the mean reward of the two policies.
set -euo pipefail
DATA=${1:-data/small}
OUT=${2:-runs/plumbing}
go() {
  local name=$1; shift
  [ -f "$OUT/$name/metrics.json" ] || torchx run -s local_cwd --log launch/components.py:train --j 1x2 \
    --config configs/cctl_small.yaml --data "$DATA" --run_dir "$OUT/$name" -- "$@" 2>&1 | grep -E "done:|rror" || true
  test -f "$OUT/$name/metrics.json"
}
go supervised selector.mode=supervised selector.lr=0.01 run.steps=300
go policy-all-ones selector.mode=fixed scn.reward_source=heldout_batch
go policy-clean-only selector.mode=oracle scn.reward_source=heldout_batch
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
m = lambda n: json.load(open(f"{out}/{n}/metrics.json"))
s = m("supervised")["selector"]
print(f"(1) supervised selector, 300 steps: harmful AUROC {s['harmful_auc']:.4f}, "
      f"p_clean {s['p_clean']:.3f}, p_harm {s['p_harmful']:.3f}")
a, c = m("policy-all-ones"), m("policy-clean-only")
print(f"(2) held-out reward, mean over {a['steps']} steps: all ones {a['reward_mean']:.6f}, "
      f"clean only {c['reward_mean']:.6f}; target test AUC {a['target_test']['auc']:.4f} vs {c['target_test']['auc']:.4f}")
PY
