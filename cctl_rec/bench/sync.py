"""``cctl-rec bench sync``: one mixed -> pure sync (§2.3.5) vs the target table's size.

For each size N in ``table_rows`` the CCTL model is built with the dataset's schema but a target
``user_id`` table of N rows (x ``model.embedding_dim``), planned and sharded as ``train()`` does
(:class:`~cctl_rec.bench.harness.Harness`). It trains ``warmup + steps`` steps on the dataset
(ids stay in the dataset's range, so lookups touch the same rows as with the small table), then
``sync_mixed_to_pure`` runs ``repeats`` times with the optimizer state (the default) and without
(``scn.sync_optimizer_state=false``). The sync's share of training at k is
``sync / (k * step)`` with the step measured on the same model.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import time
from typing import Any

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, fmt_stat, header_md, md_table,
                                   peak_rss_mib, reset_peak_rss, rss_mib, summary, target, train_config)

logger = logging.getLogger(__name__)

PAPER_K = 1000


def grown_schemas(schemas: dict, rows: int) -> dict:
    """The schemas with the target ``user_id`` table grown to ``rows`` rows (never shrunk)."""
    from cctl_rec.schema import DomainSchema

    ts = schemas["tgt"]
    feats = tuple(dataclasses.replace(f, cardinality=max(rows, f.cardinality)) if f.name == "user_id" else f
                  for f in ts.features)
    return {**schemas, "tgt": DomainSchema(ts.domain, feats)}


def _one_size(opts: BenchOptions, rows: int) -> dict[str, Any]:
    from cctl_rec.bench.harness import Harness, pure_equals_mixed, run_steps
    from cctl_rec.data.loader import Dataset
    from cctl_rec.train.sync import sync_mixed_to_pure

    cfg = train_config(opts, "model.name=cctl")
    schemas = grown_schemas(Dataset(cfg.data.path).schemas, rows)
    rss0 = rss_mib()
    t0 = time.perf_counter()
    h = Harness(cfg, schemas=schemas)
    build_s = time.perf_counter() - t0
    tgt_rows = sum(r for _, r, _ in schemas["tgt"].tables())
    run_steps(h, opts.warmup)
    steps = run_steps_timed(h, opts.steps, opts.warmup + 1)
    m = h.module
    full, weights = [], []
    reset_peak_rss()
    before = rss_mib()
    for _ in range(max(2, opts.repeats)):  # alternate: with optimizer state, weights only
        t0 = time.perf_counter()
        sync_mixed_to_pure(m, h.dense_opt, True, h.dp_tables)
        full.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sync_mixed_to_pure(m, h.dense_opt, False, h.dp_tables)
        weights.append(time.perf_counter() - t0)
    peak_extra = peak_rss_mib() - before
    sync_mixed_to_pure(m, h.dense_opt, True, h.dp_tables)
    differ = pure_equals_mixed(m)  # the copy is exact
    step = statistics.median(steps)
    k_cfg = cfg.scn.sync_every
    res = {"target_table_rows": tgt_rows, "user_rows": rows, "dim": cfg.model.embedding_dim,
           "table_mib": round(tgt_rows * cfg.model.embedding_dim * 4 / 2 ** 20, 1),
           "plan": {t: p.sharding_type for t, p in h.plan.plan.get("mixed_tgt", {}).items()},
           "build_s": round(build_s, 2), "rss_mib_after_build": round(rss_mib() - rss0, 1),
           "step_ms": summary([1e3 * s for s in steps], 3),
           "sync_ms": summary([1e3 * s for s in full], 3),
           "sync_weights_only_ms": summary([1e3 * s for s in weights], 3),
           "sync_peak_extra_rss_mib": round(peak_extra, 1),
           "pure_equals_mixed_after_sync": not differ, "differs": differ[:5],
           "share_at_k1000": round(statistics.median(full) / (PAPER_K * step), 6),
           "k_config": k_cfg, "share_at_k_config": round(statistics.median(full) / (k_cfg * step), 6)}
    h.close()
    del h, m
    gc.collect()
    logger.info("sync %d rows: %.1f ms (%.3f%% of training at k=1000)", rows, res["sync_ms"]["median"],
                100 * res["share_at_k1000"])
    return res


def run_steps_timed(h: Any, n: int, first: int) -> list[float]:
    """Seconds of ``n`` harness steps (data fetch included)."""
    out = []
    for i in range(first, first + n):
        t0 = time.perf_counter()
        h.sections.new_step()
        h.step(h.next_batch(), i)
        out.append(time.perf_counter() - t0)
    return out


def run(opts: BenchOptions) -> tuple[dict[str, Any], str]:
    with LoadSampler() as load:
        sizes = {str(r): _one_size(opts, r) for r in opts.table_rows}
    tg = []
    for r, v in sizes.items():
        tg.append(target(f"sync share at k=1000, {int(r):,} user rows", "<= 1%", v["share_at_k1000"],
                         v["share_at_k1000"] <= 0.01, f"sync {v['sync_ms']['median']:.1f} ms, step "
                                                      f"{v['step_ms']['median']:.1f} ms"))
        tg.append(target(f"pure == mixed after sync, {int(r):,} rows", "exact copy", v["pure_equals_mixed_after_sync"],
                         v["pure_equals_mixed_after_sync"], required=True))
    env = envelope("sync", opts, {"sizes": sizes}, load, tg)
    return env, markdown(env)


def markdown(env: dict[str, Any]) -> str:
    s = env["results"]["sizes"]
    rows = [[f"{int(r):,}", v["target_table_rows"], v["table_mib"], fmt_stat(v["sync_ms"]),
             fmt_stat(v["sync_weights_only_ms"]), fmt_stat(v["step_ms"]), f"{100 * v['share_at_k1000']:.3f}%",
             f"{100 * v['share_at_k_config']:.2f}% (k={v['k_config']})", v["sync_peak_extra_rss_mib"]]
            for r, v in s.items()]
    return "\n".join([header_md(env, "Mixed -> pure sync vs target-table size"),
                      md_table(["user rows", "target rows (all tables)", "table MiB", "sync ms (+opt state)",
                                "sync ms (weights only)", "step ms", "share at k=1000", "share at config k",
                                "peak extra RSS MiB"], rows), "",
                      "Sync and step times are median (min–max). The share is sync / (k x step), with the "
                      "step measured on the same model; ids in the batches stay in the dataset's range.", ""])
