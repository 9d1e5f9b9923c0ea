"""Sanity check of a generated dataset: does clean source data help the target, harmful hurt?

Trains the same small factorisation machine (embeddings of the columns both domains share:
user_id, item_id, category, gender, device, hour; plus a per-domain bias) three times:

1. ``target_only``: target train rows;
2. ``mix_all``: target train + every source row;
3. ``mix_clean``: target train + the source rows with ``is_harmful == 0``;

and reports each model's target test AUC (at the epoch with the best target valid AUC). A
generator that works gives ``target_only < mix_all < mix_clean``.

Run::

    python -m cctl_rec.datagen.check --data data/small
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

SHARED = ("user_id", "item_id", "category", "gender", "device", "hour")


def load_split(root: str, manifest: dict[str, Any], split: str,
               extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The shared columns (+ label and ``extra``) of a split as numpy arrays."""
    from cctl_rec.data.manifest import shard_paths

    cols = list(SHARED) + ["label", *extra]
    parts = [pq.read_table(p, columns=cols) for p in shard_paths(root, manifest, split)]
    return {c: np.concatenate([t[c].to_numpy() for t in parts]) for c in cols}


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``, ties sharing their average rank (``scipy.stats.rankdata``)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.concatenate([[True], xs[1:] != xs[:-1]]))
    ends = np.append(starts[1:], len(x))
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get their average rank)."""
    r = average_ranks(score)
    pos = y.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def train_fm(train: dict[str, np.ndarray], domain: np.ndarray, cards: list[int],
             evals: dict[str, dict[str, np.ndarray]], epochs: int = 3, dim: int = 16,
             batch: int = 2048, lr: float = 1e-2, seed: int = 0) -> dict[str, list[float]]:
    """Trains an FM on ``train``; returns each eval set's AUC after every epoch.

    Args:
        train: column -> array (SHARED columns and ``label``).
        domain: per-row 0 (target) / 1 (source), for the per-domain bias.
        cards: cardinality of each SHARED column.
        evals: name -> target rows to score after every epoch.
    """
    import torch

    torch.manual_seed(seed)
    offsets = torch.tensor(np.concatenate([[0], np.cumsum(cards)[:-1]]), dtype=torch.long)
    total = int(sum(cards))
    emb = torch.nn.Embedding(total, dim)
    lin = torch.nn.Embedding(total, 1)
    dbias = torch.nn.Embedding(2, 1)
    torch.nn.init.normal_(emb.weight, std=0.01)
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(dbias.weight)
    params = [emb.weight, lin.weight, dbias.weight]
    opt = torch.optim.Adam(params, lr=lr)

    def feats(d: dict[str, np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack([d[c].astype(np.int64) for c in SHARED], 1)) + offsets

    def logit(x: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
        e = emb(x)  # B X F X D
        inter = 0.5 * (e.sum(1).pow(2) - e.pow(2).sum(1)).sum(1)
        return inter + lin(x).sum((1, 2)) + dbias(dom).squeeze(1)

    x, y = feats(train), torch.from_numpy(train["label"].astype(np.float32))
    dom = torch.from_numpy(domain.astype(np.int64))
    ev = {k: (feats(v), v["label"]) for k, v in evals.items()}
    out: dict[str, list[float]] = {k: [] for k in evals}
    g = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(logit(x[idx], dom[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            for k, (xe, ye) in ev.items():
                s = torch.cat([logit(xe[i:i + 65536], torch.zeros(len(xe[i:i + 65536]),
                                                                  dtype=torch.long))
                               for i in range(0, len(xe), 65536)])
                out[k].append(auc(ye, s.numpy()))
    return out


def run_check(root: str, epochs: int = 4, seed: int = 0, lr: float = 1e-2) -> dict[str, Any]:
    """The three target test AUCs (and valid curves) of a dataset directory."""
    from cctl_rec.data.manifest import read_manifest

    m = read_manifest(root)
    feats = {f["name"]: f["cardinality"] for f in m["schema"]["tgt"]["features"]}
    src_feats = {f["name"]: f["cardinality"] for f in m["schema"]["src"]["features"]}
    cards = [max(feats[c], src_feats[c]) for c in SHARED]
    tgt = load_split(root, m, "tgt/train")
    valid, test = load_split(root, m, "tgt/valid"), load_split(root, m, "tgt/test")
    src = load_split(root, m, "src/train", extra=("is_harmful",))
    clean = {k: v[~src["is_harmful"]] for k, v in src.items()}
    results: dict[str, Any] = {}
    for name, extra in (("target_only", None), ("mix_all", src), ("mix_clean", clean)):
        t0 = time.perf_counter()
        if extra is None:
            train, dom = tgt, np.zeros(len(tgt["label"]), np.int64)
        else:
            train = {c: np.concatenate([tgt[c], extra[c]]) for c in tgt}
            dom = np.concatenate([np.zeros(len(tgt["label"]), np.int64),
                                  np.ones(len(extra["label"]), np.int64)])
        curves = train_fm(train, dom, cards, {"valid": valid, "test": test}, epochs=epochs,
                          lr=lr, seed=seed)
        best = int(np.argmax(curves["valid"]))
        results[name] = {"test_auc": round(curves["test"][best], 4), "epoch": best + 1,
                         "valid_auc": [round(a, 4) for a in curves["valid"]],
                         "train_rows": int(len(train["label"])),
                         "seconds": round(time.perf_counter() - t0, 1)}
        logger.info("%s: %s", name, results[name])
    a = [results[k]["test_auc"] for k in ("target_only", "mix_all", "mix_clean")]
    results["ordering_holds"] = bool(a[0] < a[1] < a[2])
    results["gaps"] = [round(a[1] - a[0], 4), round(a[2] - a[1], 4)]
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cctl_rec.datagen.check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset directory (with manifest.json)")
    p.add_argument("--epochs", type=int, default=4, help="epochs (best target valid AUC wins)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        r = run_check(args.data, args.epochs, args.seed, args.lr)
    except (ValueError, FileNotFoundError) as e:
        print(f"cctl_rec.datagen.check: error: {e}", file=sys.stderr)
        return 2
    for k in ("target_only", "mix_all", "mix_clean"):
        print(f"{k:12s} target test AUC {r[k]['test_auc']:.4f}  (epoch {r[k]['epoch']}, "
              f"{r[k]['train_rows']} train rows, {r[k]['seconds']} s)")
    print(f"ordering target_only < mix_all < mix_clean: {'holds' if r['ordering_holds'] else 'FAILS'}"
          f" (gaps {r['gaps'][0]:+.4f}, {r['gaps'][1]:+.4f})")
    print(json.dumps(r))
    return 0 if r["ordering_holds"] else 1


if __name__ == "__main__":
    sys.exit(main())
