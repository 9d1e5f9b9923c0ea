"""``cctl-rec bench scaling``: 1, 2, 4, 8... gloo ranks — what each rank does and sends per step.

Each world size runs in its own ``world_size`` processes (spawned, file:// rendezvous, one torch
thread per rank). Every rank builds the harness (``train()``'s model, plan and step), trains
``warmup + steps`` steps (timed), then counts every collective of ``repeats`` more steps: a
``TorchDispatchMode`` sees each ``c10d`` op as the dispatcher runs it — TorchRec's KJT and
pooled-embedding all-to-alls, DDP's gradient buckets, the loop's metric all-reduce, the
data_parallel tables' all-reduce — with its tensors, so the bytes are counted, not estimated.
Each op is tagged with the step part it ran in. One sync and one selector update are counted the
same way, and one sync is timed (``repeats`` times, after a barrier). All-to-all bytes are split
into those kept on the rank and those sent to others (from
the op's split sizes); all-reduce and broadcast bytes are the payload (gloo's ring sends about
2 (W-1)/W of it per rank).

On this machine the ranks share the vCPUs with each other (and other jobs), so step times show the
cost of the communication, not a speed-up.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from typing import Any

from cctl_rec.bench.common import (BenchOptions, LoadSampler, envelope, fmt_stat, header_md, md_table, summary,
                                   target, train_config)

logger = logging.getLogger(__name__)


def _nbytes(a: Any) -> int:
    import torch

    if isinstance(a, torch.Tensor):
        return a.numel() * a.element_size()
    if isinstance(a, (list, tuple)):
        return sum(_nbytes(x) for x in a)
    return 0


class CommCounter:
    """Counts the bytes of every ``c10d`` collective dispatched while active, by (part, op).

    Args:
        rank: this rank (to split all-to-all bytes into kept and sent).
        part: called per op: the step part it runs in (e.g. the harness's open span).
    """

    def __init__(self, rank: int, part: Any) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                name = str(func)
                if name.startswith("c10d."):
                    counter.record(name.split(".")[1].rstrip("_"), args)
                return func(*args, **(kwargs or {}))

        self.rank, self.part = rank, part
        self.mode = _Mode()
        self.ops: dict[tuple[str, str], dict[str, int]] = {}

    def record(self, op: str, args: tuple) -> None:
        import torch

        tensors = [a for a in args if isinstance(a, torch.Tensor) or (isinstance(a, (list, tuple)) and a and
                                                                     isinstance(a[0], torch.Tensor))]
        e = self.ops.setdefault((self.part(), op), {"calls": 0, "bytes": 0, "sent_bytes": 0})
        e["calls"] += 1
        if op == "alltoall_base" and len(tensors) >= 2:
            inp = tensors[1]
            b = _nbytes(inp)
            splits = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], int)]
            in_splits = splits[1] if len(splits) >= 2 else None
            if in_splits and sum(in_splits) and inp.dim() > 0:
                row = b // max(1, inp.shape[0])
                sent = (sum(in_splits) - in_splits[self.rank]) * row
            else:
                ws = max(1, _world())
                sent = b * (ws - 1) // ws
            e["bytes"] += b
            e["sent_bytes"] += sent
        elif op in ("allreduce", "allreduce_coalesced", "broadcast", "reduce", "allgather", "allgather_into_tensor",
                    "_allgather_base", "reduce_scatter", "_reduce_scatter_base", "alltoall", "gather", "scatter"):
            b = _nbytes(tensors[-1] if op in ("allgather", "allgather_into_tensor", "_allgather_base", "gather")
                        and len(tensors) > 1 else tensors[0]) if tensors else 0
            e["bytes"] += b
            e["sent_bytes"] += b if _world() > 1 else 0

    def __enter__(self) -> "CommCounter":
        self.mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.mode.__exit__(*exc)


def _world() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def _rank_main(rank: int, world: int, init_file: str, opts: BenchOptions, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.pop("MASTER_ADDR", None)
    import torch
    import torch.distributed as dist

    from cctl_rec.logging_utils import setup_logging

    setup_logging()
    torch.set_num_threads(max(1, opts.threads))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(_measure_rank(rank, world, opts), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _measure_rank(rank: int, world: int, opts: BenchOptions) -> dict[str, Any]:
    import torch.distributed as dist

    from cctl_rec.bench.harness import Harness

    h = Harness(train_config(opts, "model.name=cctl"))
    n = 0
    times = []
    for i in range(opts.warmup + opts.steps):
        n += 1
        h.sections.new_step()
        b = h.next_batch()
        dist.barrier()
        t0 = time.perf_counter()
        h.step(b, n)
        if i >= opts.warmup:
            times.append(time.perf_counter() - t0)
    part = lambda: h.sections.stack[0] if h.sections.stack else "other"  # noqa: E731
    counter = CommCounter(rank, part)
    ids = []
    k, every = h.cfg.scn.sync_every, h.cfg.selector.update_every
    with counter:
        for _ in range(opts.repeats):
            n += 1
            if n % k == 0 or n % every == 0:  # the periodic parts are counted on their own below
                n += 1
            h.sections.new_step()
            b = h.next_batch()
            ids.append({"tgt": int(b.tgt.values().numel()), "src": int(b.src.values().numel()) if b.src is not None
                        else 0, "mixed": int(b.mixed.values().numel()) if b.mixed is not None else 0})
            h.step(b, n)
    per_step = {f"{p}/{op}": {kk: v // opts.repeats for kk, v in e.items()} for (p, op), e in counter.ops.items()}
    sync_counter = CommCounter(rank, lambda: "sync")
    with sync_counter:
        h.sync()
    sync_times = []
    for _ in range(max(1, opts.repeats)):
        dist.barrier()
        t0 = time.perf_counter()
        h.sync()
        sync_times.append(time.perf_counter() - t0)
    upd_counter = CommCounter(rank, lambda: "selector_update")
    assert h.ifn is not None and h.ifn.rl is not None
    with upd_counter:
        h.ifn.rl.update()
    plan = {mod: {t: {"type": p.sharding_type, "ranks": p.ranks} for t, p in tables.items()}
            for mod, tables in h.plan.plan.items()}
    return {"rank": rank, "step_ms": summary([1e3 * t for t in times], 3), "per_step": per_step,
            "sync_ms": summary([1e3 * t for t in sync_times], 3),
            "sync": {f"{p}/{op}": e for (p, op), e in sync_counter.ops.items()},
            "selector_update": {f"{p}/{op}": e for (p, op), e in upd_counter.ops.items()},
            "ids_per_step": {kk: statistics.median(x[kk] for x in ids) for kk in ids[0]},
            "target_rows": h.cfg.data.batch_size, "source_rows": h.stream.src_batch, "plan": plan,
            "dense_params": sum(p.numel() for g in h.dense_opt.param_groups for p in g["params"])}


def _spawn(world: int, opts: BenchOptions) -> list[dict[str, Any]]:
    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="cctl-bench-") as d:
        mp.spawn(_rank_main, args=(world, os.path.join(d, "pg"), opts, d), nprocs=world, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=True) for r in range(world)]


def run(opts: BenchOptions) -> tuple[dict[str, Any], str]:
    with LoadSampler() as load:
        res: dict[str, Any] = {}
        for w in opts.world_sizes:
            ranks = _spawn(w, opts)
            tot = lambda key: sum(e[key] for e in ranks[0]["per_step"].values())  # noqa: E731
            res[str(w)] = {"ranks": ranks, "rank0_bytes_per_step": tot("bytes"),
                           "rank0_sent_bytes_per_step": tot("sent_bytes"),
                           "global_target_rows_per_step": w * ranks[0]["target_rows"],
                           "rank0_step_ms": ranks[0]["step_ms"],
                           "rank0_target_rows_per_s": ranks[0]["target_rows"] / (ranks[0]["step_ms"]["median"] / 1e3),
                           "rank0_sync_ms": ranks[0]["sync_ms"]}
            logger.info("scaling %d rank(s): step %.1f ms, rank 0 sends %d bytes per step", w,
                        ranks[0]["step_ms"]["median"], res[str(w)]["rank0_sent_bytes_per_step"])
    tg = []
    for w, r in res.items():
        sync_bytes = sum(e["sent_bytes"] for x in r["ranks"] for e in x["sync"].values())
        tg.append(target(f"sync is shard-local ({w} rank(s))", "0 bytes sent", sync_bytes, sync_bytes == 0,
                         required=True))
    env = envelope("scaling", opts, res, load, tg)
    return env, markdown(env)


def markdown(env: dict[str, Any]) -> str:
    res = env["results"]
    sizes = " vs ".join(res)
    lines = [header_md(env, f"Scaling: {sizes} gloo ranks, accounting and bytes per step"), ""]
    rows = []
    for w, r in res.items():
        r0 = r["ranks"][0]
        rows.append([w, r0["target_rows"], r0["source_rows"], r["global_target_rows_per_step"],
                     fmt_stat(r0["step_ms"]), f"{r0['target_rows'] / (r0['step_ms']['median'] / 1e3):,.0f}",
                     r["rank0_bytes_per_step"], r["rank0_sent_bytes_per_step"],
                     fmt_stat(r0["sync_ms"]) if "sync_ms" in r0 else "-", r0["dense_params"]])
    lines += [md_table(["ranks", "target rows / rank", "source rows / rank", "global target rows / step",
                        "step ms (rank 0)", "target rows / s / rank", "collective bytes / step (rank 0)",
                        "sent to other ranks", "sync ms (rank 0)", "dense params (DDP)"], rows), ""]
    for w, r in res.items():
        r0 = r["ranks"][0]
        lines += [f"## {w} rank(s): collectives per step on rank 0 (by step part)", "",
                  md_table(["part/op", "calls", "bytes", "sent to other ranks"],
                           [[k, e["calls"], e["bytes"], e["sent_bytes"]] for k, e in sorted(r0["per_step"].items())]),
                  "", f"- one sync: {sum(e['sent_bytes'] for e in r0['sync'].values())} bytes sent "
                      f"({sum(e['calls'] for e in r0['sync'].values())} collectives); one selector update: "
                      f"{sum(e['bytes'] for e in r0['selector_update'].values())} bytes "
                      f"({sum(e['calls'] for e in r0['selector_update'].values())} collectives)",
                  f"- ids looked up per step on rank 0: {r0['ids_per_step']}",
                  "- plan: " + "; ".join(f"{m}: " + ", ".join(f"{t} {p['type']} {p['ranks']}" for t, p in tb.items())
                                        for m, tb in r0["plan"].items()), ""]
    return "\n".join(lines)
