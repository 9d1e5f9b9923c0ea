"""How long the whole transfer benchmark takes on a quiet machine, from a re-timed sample.

Usage: python scripts/transfer_timing.py runs/transfer/results.json runs/transfer-timing/results.json

The benchmark's own ``compute time`` sums each run's wall time as it was recorded, under whatever
else ran on the machine then. The sample (the same config with ``seeds: [0]``, run with nothing else
at normal priority) re-times one seed of every (dataset, model); a run's time hardly depends on its
seed (same data, same steps). The estimate is each sampled time times the benchmark's seed count
for that dataset; datasets not in the sample keep their recorded times. It also checks that every
re-timed run reproduced the benchmark's metrics bit for bit (1-thread runs are deterministic).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict


def load(path: str) -> list[dict]:
    with open(path) as f:
        return [r for r in json.load(f)["runs"] if r.get("status") == "ok"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("benchmark", help="the benchmark's results.json")
    ap.add_argument("sample", help="the re-timed sample's results.json")
    ap.add_argument("--jobs", type=int, default=2, help="workers the benchmark runs on (default 2)")
    a = ap.parse_args()
    bench, sample = load(a.benchmark), load(a.sample)
    seeds: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in bench:
        seeds[(r["dataset"], r["model"])].append(r)
    timed = {(r["dataset"], r["model"]): r for r in sample if "wall_seconds" in r}
    recorded = quiet = 0.0
    same = differ = 0
    per_dataset: dict[str, float] = defaultdict(float)
    for key, runs in seeds.items():
        rec = sum(r.get("wall_seconds", 0.0) for r in runs)
        recorded += rec
        if key in timed:
            est = timed[key]["wall_seconds"] * len(runs)
            ref = next((r for r in runs if r["seed"] == timed[key]["seed"]), None)
            if ref is not None:
                if ref["metrics"].get("target_test") == timed[key]["metrics"].get("target_test"):
                    same += 1
                else:
                    differ += 1
        else:
            est = rec
        quiet += est
        per_dataset[key[0]] += est
    print(f"runs: {sum(len(v) for v in seeds.values())}; (dataset, model) pairs re-timed: {len(timed)} of {len(seeds)}")
    print(f"recorded compute: {recorded / 60:.1f} worker-min")
    print(f"quiet estimate:   {quiet / 60:.1f} worker-min = {quiet / 60 / a.jobs:.1f} min on {a.jobs} workers")
    print(f"re-timed runs whose test metrics equal the benchmark's bit for bit: {same} of {same + differ}")
    for ds, s in sorted(per_dataset.items(), key=lambda kv: -kv[1]):
        print(f"  {ds:24s} {s / 60:6.1f} worker-min")


if __name__ == "__main__":
    main()
