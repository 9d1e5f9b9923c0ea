"""``cctl-rec bench data``: Parquet -> KeyedJaggedTensor rows/s against the trainer's consumption.

Readers, alternating in rounds over ``steps`` batches each (after ``warmup`` batches):

- ``tgt`` / ``src``: one domain's :class:`~cctl_rec.data.reader.ParquetStream` at the training
  batch size and :func:`~cctl_rec.data.reader.features_kjt` (read, ids checked, KJT);
- ``cctl``: :class:`~cctl_rec.data.loader.TrainStream` as ``train()`` reads it for CCTL: a target
  batch, its ``src_ratio`` source rows, REN lookups and shared attributes -> one CCTLBatch;
- ``dnn``: the same for the target-only model.

The trainer's consumption is the harness step without its data fetch (same process, alternating
with the readers), in target rows/s; the target is loader >= 5x consumption. The loader runs in
the training process (no prefetch thread), so its time adds to every step.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Any, Callable, Iterator

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, fmt_stat, header_md, md_table, summary,
                                   target, train_config)
from cctl_rec.bench.train import TOP

logger = logging.getLogger(__name__)


def _readers(opts: BenchOptions) -> dict[str, tuple[Callable[[], Iterator[Any]], int, int]]:
    """name -> (a fresh iterator factory, target rows per item, all rows per item)."""
    from cctl_rec.data.loader import Dataset, TrainStream
    from cctl_rec.data.reader import ParquetStream, features_kjt

    cfg = train_config(opts)
    data = Dataset(cfg.data.path)
    d = cfg.data
    src_b = int(round(d.batch_size * d.src_ratio))
    shared = _shared(data, cfg)

    def domain(dom: str, b: int) -> Callable[[], Iterator[Any]]:
        def gen() -> Iterator[Any]:
            s = ParquetStream(data.paths(f"{dom}/train"), data.schemas[dom], b, cycle=True)
            for rows in s:
                yield features_kjt(rows, data.schemas[dom], d.max_seq_len, d.long_seq)
        return gen

    return {"tgt": (domain("tgt", d.batch_size), d.batch_size, d.batch_size),
            "src": (domain("src", src_b), 0, src_b),
            "cctl": (lambda: _cycle(lambda: TrainStream(data, d, 0, 1, True, shared).iterate(0)), d.batch_size,
                     d.batch_size + src_b),
            "dnn": (lambda: _cycle(lambda: TrainStream(data, d, 0, 1, False).iterate(0)), d.batch_size,
                    d.batch_size)}


def _shared(data: Any, cfg: Any) -> tuple[str, ...]:
    from cctl_rec.models.cctl import CCTL

    return CCTL(data.schemas, cfg.model, with_source=True).shared  # tables on meta: nothing allocated


def _cycle(make: Callable[[], Iterator[Any]]) -> Iterator[Any]:
    while True:
        yield from make()


def run(opts: BenchOptions) -> tuple[dict[str, Any], str]:
    from cctl_rec.bench.harness import Harness

    with LoadSampler() as load:
        readers = _readers(opts)
        its = {k: f() for k, (f, _, _) in readers.items()}
        for it in its.values():
            for _ in range(max(1, opts.warmup)):
                next(it)
        hs = {m: Harness(train_config(opts, f"model.name={m}")) for m in ("cctl", "dnn")}
        times: dict[str, list[float]] = {k: [] for k in its}
        compute: dict[str, list[float]] = {k: [] for k in hs}
        n = 0
        for _ in range(opts.warmup):
            n += 1
            for h in hs.values():
                h.step(h.next_batch(), n)
        for r in range(opts.repeats):
            for k, it in its.items():
                t0 = time.perf_counter()
                for _ in range(opts.steps):
                    next(it)
                times[k].append((time.perf_counter() - t0) / opts.steps)
            for _ in range(opts.steps):
                n += 1
                for m, h in hs.items():
                    h.sections.new_step()
                    h.step(h.next_batch(), n)
                    compute[m].append(sum(h.sections.cur.get(x, 0.0) for x in TOP if x != "data"))
        res: dict[str, Any] = {"readers": {}, "trainer": {}, "ratio": {}}
        for k, (_, tgt_rows, all_rows) in readers.items():
            res["readers"][k] = {"rows_per_item": all_rows, "target_rows_per_item": tgt_rows,
                                 "rows_per_s": summary([all_rows / t for t in times[k]], 0),
                                 "target_rows_per_s": (summary([tgt_rows / t for t in times[k]], 0) if tgt_rows
                                                       else None),
                                 "ms_per_batch": summary([1e3 * t for t in times[k]], 3)}
        b = hs["cctl"].cfg.data.batch_size
        for m in hs:
            res["trainer"][m] = {"compute_ms_per_step": summary([1e3 * t for t in compute[m]], 3),
                                 "target_rows_per_s": round(b / statistics.median(compute[m]), 1)}
            res["ratio"][m] = round(res["readers"][m]["target_rows_per_s"]["median"] /
                                    res["trainer"][m]["target_rows_per_s"], 2)
    tg = [target(f"loader / trainer ({m})", ">= 5x", v, v >= 5.0,
                 f"loader {res['readers'][m]['target_rows_per_s']['median']:,.0f} vs trainer "
                 f"{res['trainer'][m]['target_rows_per_s']:,.0f} target rows/s") for m, v in res["ratio"].items()]
    env = envelope("data", opts, res, load, tg)
    return env, markdown(env)


def markdown(env: dict[str, Any]) -> str:
    r = env["results"]
    rows = [[k, v["rows_per_item"], fmt_stat(v["rows_per_s"], nd=0),
             fmt_stat(v["target_rows_per_s"], nd=0) if v["target_rows_per_s"] else "n/a", fmt_stat(v["ms_per_batch"])]
            for k, v in r["readers"].items()]
    trows = [[m, fmt_stat(v["compute_ms_per_step"]), v["target_rows_per_s"], r["ratio"][m]]
             for m, v in r["trainer"].items()]
    return "\n".join([header_md(env, "Data: Parquet -> KJT vs the trainer"),
                      md_table(["reader", "rows per batch", "rows/s", "target rows/s", "ms per batch"], rows), "",
                      md_table(["trainer", "compute ms/step (no data)", "target rows/s consumed",
                                "loader / trainer"], trows), "",
                      "Median (min–max) over rounds of the readers, and over steps of the trainer.", ""])
