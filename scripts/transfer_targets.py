"""Issue 16's targets checked on a transfer benchmark's results.json (configs/experiments/transfer*.yaml).

Usage: python scripts/transfer_targets.py runs/transfer/results.json [--product "CCTL (default)"] > targets.md

Dataset names are <pair>-<variant>, variant one of dense, s20, s5 (sparse targets) and s20c30 (sparse,
30% of the source corrupted). Every delta is the mean over the seeds both models ran, paired by seed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from typing import Optional


def paired(a: dict, b: dict) -> Optional[float]:
    sa, sb = dict(zip(a["seeds"], a["auc"])), dict(zip(b["seeds"], b["auc"]))
    common = sorted(set(sa) & set(sb))
    return statistics.mean(sa[s] - sb[s] for s in common) if common else None


def mean(r: Optional[dict]) -> Optional[float]:
    return statistics.mean(r["auc"]) if r and r["auc"] else None


def f(x: Optional[float], nd: int = 4, sign: bool = True) -> str:
    return "-" if x is None else (f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--product", default="CCTL (default)")
    args = ap.parse_args(argv)
    res = json.load(open(args.results))["summary"]
    P = args.product
    out = [f"# Issue 16's targets on `{args.results}` (product: {P})", ""]

    out += ["## 1. Every dataset: product >= Mix - 0.0005", "", "| dataset | seeds | Δ vs Mix | holds |", "|---|---|---|---|"]
    ok1 = []
    for ds, r in res.items():
        m = r["models"]
        if P not in m or "Mix" not in m or not m[P]["auc"]:
            continue
        d = paired(m[P], m["Mix"])
        ok1.append(d is not None and d >= -0.0005)
        out.append(f"| {ds} | {len(m[P]['auc'])} | {f(d)} | {'yes' if ok1[-1] else 'NO'} |")
    out += ["", f"Holds on {sum(ok1)}/{len(ok1)} datasets.", ""]

    out += ["## 2. Sparse targets where Mix beats the DNN: product >= max(Mix, DANN, STAR) + 0.002 on >= 3 of 5 pairs", "",
            "| dataset | Mix - DNN | best of Mix/DANN/STAR | product - best | holds |", "|---|---|---|---|---|"]
    pairs: dict[str, list[bool]] = {}
    for ds, r in res.items():
        pair, _, variant = ds.rpartition("-")
        if variant not in ("s20", "s5"):
            continue
        m = r["models"]
        if not all(k in m and m[k]["auc"] for k in (P, "Mix", "DNN")):
            continue
        gap = paired(m["Mix"], m["DNN"])
        if gap is None or gap <= 0:
            out.append(f"| {ds} | {f(gap)} | (Mix does not beat the DNN: no headroom) | - | - |")
            continue
        best = max((k for k in ("Mix", "DANN", "STAR") if k in m and m[k]["auc"]), key=lambda k: mean(m[k]))
        d = paired(m[P], m[best])
        hold = d is not None and d >= 0.002
        pairs.setdefault(pair, []).append(hold)
        out.append(f"| {ds} | {f(gap)} | {best} {f(mean(m[best]), sign=False)} | {f(d)} | {'yes' if hold else 'NO'} |")
    won = [p for p, v in pairs.items() if all(v)]
    out += ["", f"Pairs with headroom: {len(pairs)}; pairs where it holds on every sparse variant with headroom: "
            f"{len(won)} ({', '.join(won) or 'none'}). Target (3 of 5): {'met' if len(won) >= 3 else 'NOT met'}.", ""]

    out += ["## 3. Sparse + 30% corrupted source: harmful AUROC >= 0.85, product >= Mix + 0.005, >= 60% of the oracle's margin",
            "", "| dataset | harmful AUROC | Δ vs Mix | oracle - Mix | share of the oracle's margin | holds |",
            "|---|---|---|---|---|---|"]
    for ds, r in res.items():
        if not ds.endswith("-s20c30"):
            continue
        m = r["models"]
        if not all(k in m and m[k]["auc"] for k in (P, "Mix")):
            continue
        h = statistics.mean(m[P]["harmful_auc"]) if m[P]["harmful_auc"] else None
        d = paired(m[P], m["Mix"])
        o = paired(m["Oracle"], m["Mix"]) if "Oracle" in m and m["Oracle"]["auc"] else None
        share = d / o if d is not None and o and o > 0 else None
        hold = h is not None and h >= 0.85 and d is not None and d >= 0.005 and share is not None and share >= 0.6
        out.append(f"| {ds} | {f(h, 3, False)} | {f(d)} | {f(o)} | {'-' if share is None else f'{share:.0%}'} | "
                   f"{'yes' if hold else 'NO'} |")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
