"""Dry-run sharding plans for a whole CCTL model: per-rank memory and estimated cost of every table
CCTL trains, and a comparison of sharding strategies.

The planner runs on meta-device tables (nothing is allocated, no GPU needed). The mixed and pure
target tables get one (mirrored) plan, so the per-rank totals are recomputed here from the final
plan: weights (fp32) plus the sparse optimizer's state (rowwise Adagrad: one fp32 per row and
shard; Adagrad / Adam: one / two per element). The step cost is the planner's own estimate
(TorchRec's perf model: embedding forward/backward compute and communication per shard), summed
per rank over the final placement; the slowest rank bounds the step.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Iterator, Optional

from torchrec.distributed.planner.types import PlannerError

from cctl_rec.config import ModelConfig
from cctl_rec.distributed.sharding import GPU_SHARDING, apply_sparse_optimizer, mirrored_shards, run_planner
from cctl_rec.models.cctl import CCTL
from cctl_rec.schema import DomainSchema

logger = logging.getLogger(__name__)

GB = 1024 ** 3
OPT_STATE = {"exact_rowwise_adagrad": "row", "exact_adagrad": 1, "exact_sgd": 0, "adam": 2}
MODULES = ("mixed_tgt", "pure_tgt", "src")
COMPARE_SHARDINGS = ("auto", "table_wise", "row_wise", "column_wise", "table_row_wise", "data_parallel")
COMPARE_WORLD_SIZES = (8, 16, 64)


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def plan_to_json(plan: Any) -> dict:
    """TorchRec ShardingPlan -> {module: {table: {sharding_type, compute_kernel, ranks, shards}}}."""
    out: dict = {}
    for module, tables in plan.plan.items():
        out[module] = {}
        for table, ps in tables.items():
            shards = []
            spec = ps.sharding_spec
            for s in getattr(spec, "shards", []) or []:
                shards.append({"offsets": list(s.shard_offsets), "sizes": list(s.shard_sizes),
                               "placement": str(s.placement)})
            out[module][table] = {"sharding_type": ps.sharding_type, "compute_kernel": ps.compute_kernel,
                                  "ranks": list(ps.ranks) if ps.ranks is not None else None, "shards": shards}
    return out


@contextlib.contextmanager
def capture_planner_stats() -> Iterator[list[str]]:
    """Collects the planner's stats table (TorchRec logs it line by line) into the yielded list."""
    h = _Lines()
    log = logging.getLogger("torchrec.distributed.planner.stats")
    old = log.level, log.propagate
    log.addHandler(h)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        yield h.lines
    finally:
        log.removeHandler(h)
        log.level, log.propagate = old


def _opt_bytes(rows: int, cols: int, opt: Any) -> int:
    return 4 * (rows if opt == "row" else rows * cols * opt)


def table_bytes(model: CCTL, optimizer: str) -> list[dict[str, Any]]:
    """Every table CCTL trains with its weight and optimizer-state bytes (one replica), largest first."""
    out = []
    for mod in MODULES:
        for c in getattr(model, mod).embedding_bag_configs():
            w = 4 * c.num_embeddings * c.embedding_dim
            out.append({"name": f"{mod}.{c.name}", "rows": c.num_embeddings, "dim": c.embedding_dim,
                        "bytes": w + _opt_bytes(c.num_embeddings, c.embedding_dim, OPT_STATE[optimizer])})
    return sorted(out, key=lambda t: -t["bytes"])


def build_model(schemas: dict[str, DomainSchema], device: str, dim: int, optimizer: str) -> CCTL:
    model = CCTL(schemas, ModelConfig(embedding_dim=dim), with_source=True)
    apply_sparse_optimizer(model, optimizer if device == "cuda" or optimizer != "adam" else "exact_rowwise_adagrad",
                           0.01, device)
    return model


def plan_model(schemas: dict[str, DomainSchema], world_size: int, device: str, hbm_gb: float,
               ddr_gb: Optional[float], sharding: str, batch_size: int, dim: int = 8,
               optimizer: str = "exact_rowwise_adagrad") -> dict[str, Any]:
    """Plans CCTL's tables (mixed + pure target, source) and returns a JSON-able report.

    Raises:
        ValueError: the tables do not fit; the message names the largest table and what it needs.
    """
    model = build_model(schemas, device, dim, optimizer)
    hbm = int(hbm_gb * GB) if device == "cuda" else None
    ddr = int((ddr_gb if ddr_gb is not None else (hbm_gb if device == "cpu" else 128.0)) * GB)
    cap_gb = hbm_gb if device == "cuda" else ddr / GB
    t0 = time.perf_counter()
    with capture_planner_stats() as stats:
        try:
            plan, options = run_planner(model, world_size, device, sharding, batch_size, hbm_cap=hbm, ddr_cap=ddr)
        except PlannerError as e:
            tb = table_bytes(model, optimizer)
            big = tb[0]
            first = str(e).strip().splitlines()[0][:200]
            raise ValueError(
                f"the tables do not fit {world_size} x {cap_gb:g} GB ({device}, sharding={sharding}): the largest, "
                f"{big['name']} ({big['rows']:,} x {big['dim']}), needs {big['bytes'] / GB:.2f} GB with its "
                f"optimizer state, all {len(tb)} tables {sum(t['bytes'] for t in tb) / GB:.2f} GB; planner: {first}"
            ) from None
    seconds = time.perf_counter() - t0
    per_rank = [0.0] * world_size
    tables = []
    configs = {}
    for mod_name in MODULES:
        for c in getattr(model, mod_name).embedding_bag_configs():
            configs[(mod_name, c.name)] = c
    opt = OPT_STATE[optimizer]
    for mod_name, mod_plan in plan.plan.items():
        for t, ps in mod_plan.items():
            c = configs[(mod_name, t)]
            shards = [(s.shard_sizes, s.placement.rank()) for s in (ps.sharding_spec.shards if ps.sharding_spec else [])]
            if not shards:  # data_parallel: a full replica on every rank
                shards = [([c.num_embeddings, c.embedding_dim], r) for r in range(world_size)]
            for (rows, cols), r in shards:
                per_rank[r] += 4.0 * rows * cols + _opt_bytes(rows, cols, opt)
            tables.append({"module": mod_name, "table": t, "rows": c.num_embeddings, "dim": c.embedding_dim,
                           "sharding": ps.sharding_type, "kernel": ps.compute_kernel,
                           "ranks": sorted({r for _, r in shards}),
                           "gb": 4.0 * c.num_embeddings * c.embedding_dim / GB})
    # the planner's estimates over the final placement (pure_tgt is placed like mixed_tgt)
    perf = [0.0] * world_size
    planner_bytes = 0
    for _, _, sh in mirrored_shards(options):
        perf[sh.rank] += sh.perf.total if sh.perf is not None else 0.0
        planner_bytes += (sh.storage.hbm + sh.storage.ddr) if sh.storage is not None else 0
    uvm = sorted({f"{t['module']}.{t['table']}" for t in tables if "uvm" in t["kernel"]})
    return {"world_size": world_size, "device": device, "hbm_gb_per_rank": hbm_gb if device == "cuda" else None,
            "ddr_gb_per_rank": ddr / GB, "sharding": sharding, "batch_size": batch_size, "optimizer": optimizer,
            "per_rank_gb": [x / GB for x in per_rank], "peak_gb": max(per_rank) / GB,
            "fits": True, "uvm_tables": uvm, "total_gb": sum(per_rank) / GB,
            "planner_gb": planner_bytes / GB, "per_rank_est_ms": perf, "est_step_ms": max(perf),
            "plan_seconds": seconds, "tables": tables, "plan": plan_to_json(plan), "plan_text": str(plan),
            "stats_table": "\n".join(stats)}


def compare(schemas: dict[str, DomainSchema], world_sizes: tuple[int, ...], shardings: tuple[str, ...],
            device: str, hbm_gb: float, ddr_gb: Optional[float], batch_size: int, dim: int = 8
            ) -> list[dict[str, Any]]:
    """One row per (world size, sharding): fits or not, per-rank peak and mean memory, the
    planner's estimated step cost, host-resident (UVM) tables and the planning time."""
    for sh in shardings:
        if sh != "auto" and sh not in GPU_SHARDING:
            raise ValueError(f"--shardings: {sh!r} is not a sharding type; expected auto or one of "
                             f"{list(GPU_SHARDING)}")
    rows = []
    for ws in world_sizes:
        for sh in shardings:
            t0 = time.perf_counter()
            try:
                rep = plan_model(schemas, ws, device, hbm_gb, ddr_gb, sh, batch_size, dim)
            except ValueError as e:
                rows.append({"world_size": ws, "sharding": sh, "fits": False, "reason": str(e),
                             "plan_seconds": time.perf_counter() - t0})
                logger.info("%d x %s: does not fit", ws, sh)
                continue
            types = sorted({t["sharding"] for t in rep["tables"]})
            rows.append({"world_size": ws, "sharding": sh, "fits": True, "peak_gb": rep["peak_gb"],
                         "mean_gb": rep["total_gb"] / ws, "total_gb": rep["total_gb"],
                         "est_step_ms": rep["est_step_ms"], "uvm_tables": rep["uvm_tables"],
                         "types_used": types, "plan_seconds": rep["plan_seconds"]})
            logger.info("%d x %s: peak %.2f GB, est. %.2f ms (%.1fs to plan)", ws, sh, rep["peak_gb"],
                        rep["est_step_ms"], rep["plan_seconds"])
    return rows


def compare_markdown(rows: list[dict[str, Any]], hbm_gb: float) -> str:
    """The comparison as a markdown table."""
    out = [f"| GPUs | sharding | fits {hbm_gb:g} GB | peak GB/rank | mean GB/rank | est. step ms (slowest rank) "
           "| UVM tables | types chosen | plan s |",
           "|---:|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if r["fits"]:
            out.append(f"| {r['world_size']} | {r['sharding']} | yes{' (UVM)' if r['uvm_tables'] else ''} | "
                       f"{r['peak_gb']:.2f} | {r['mean_gb']:.2f} | {r['est_step_ms']:.2f} | "
                       f"{len(r['uvm_tables'])} | {', '.join(r['types_used'])} | {r['plan_seconds']:.1f} |")
        else:
            out.append(f"| {r['world_size']} | {r['sharding']} | no | - | - | - | - | - | {r['plan_seconds']:.1f} |")
    return "\n".join(out) + "\n"


def compare_png(rows: list[dict[str, Any]], path: str, hbm_gb: float) -> None:
    """Two panels: per-rank peak memory and the planner's estimated step cost, per strategy and
    world size (a missing bar: the plan does not fit)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cctl_rec.data.manifest import atomic_write_bytes

    shardings = list(dict.fromkeys(r["sharding"] for r in rows))
    sizes = list(dict.fromkeys(r["world_size"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / max(len(shardings), 1)
    for i, sh in enumerate(shardings):
        for ax, key in zip(axes, ("peak_gb", "est_step_ms")):
            xs, ys = [], []
            for j, ws in enumerate(sizes):
                r = next((r for r in rows if r["world_size"] == ws and r["sharding"] == sh), None)
                if r is not None and r["fits"]:
                    xs.append(j + i * width)
                    ys.append(r[key])
                elif r is not None:
                    ax.text(j + i * width, 0, "x", ha="center", va="bottom", color="red", fontsize=9)
            ax.bar(xs, ys, width, label=sh)
    for ax, title in zip(axes, (f"peak memory per rank (GB; {hbm_gb:g} GB HBM)", "planner's est. step cost (ms)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sizes))], [f"{ws} GPUs" for ws in sizes])
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].axhline(hbm_gb, color="grey", linestyle="--", linewidth=1)
    axes[1].legend(fontsize=8)
    fig.suptitle("CCTL on the meituan preset: sharding strategies (x = does not fit)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
