"""Throughput and memory of the generator: rows/s per worker and peak RSS.

``bench_datagen`` generates ``rows`` rows in shard-sized blocks (both domains, in the preset's
source/target mix), first in memory only (``Generator.shard_table``), then through the path
``cctl-rec datagen`` runs per shard (``writer.write_shard``: generate, Parquet encode + zstd,
sha256, atomic rename through iopath, shard statistics and sidecars) into a temp directory, and
extrapolates the time of the full ``meituan`` preset on a given number of cores.

Rates are rows per wall second and rows per CPU second of the worker process. On an idle core
the two agree; on a shared machine the wall rate drops with the CPU share the worker gets
(``cpu_share``), while the CPU rate measures the work itself.

Run::

    python -m datagen.bench --preset small --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

MEITUAN_ROWS = 250_000_000 + 1_200_000_000


def _blocks(params: Any, rows: int) -> list[tuple[str, int]]:
    """(domain, rows) blocks of at most shard_rows, interleaved in the preset's domain mix."""
    per = min(int(params.knobs["shard_rows"]), rows)
    share_src = params.src.samples / (params.src.samples + params.tgt.samples)
    out, done, src_done = [], 0, 0
    while done < rows:
        n = min(per, rows - done)
        d = "src" if src_done < share_src * (done + n) else "tgt"
        src_done += n if d == "src" else 0
        out.append((d, n))
        done += n
    return out


def peak_rss_mib() -> float:
    """This process's own peak RSS in MiB.

    On Linux ``ru_maxrss`` survives ``exec``, so a spawned worker would report the RSS of the
    process that started it when that was larger (e.g. a parent that imported torch); the
    ``VmHWM`` of ``/proc/self/status`` belongs to the process's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _one_worker(preset: str, rows: int, write: bool, seed: int) -> dict[str, float]:
    from cctl_rec.datagen.generator import DAY, T0, Generator, calibrate, schemas_of
    from cctl_rec.datagen.presets import resolve
    from cctl_rec.datagen.writer import ShardTask, sidecars, write_shard

    params = calibrate(resolve(preset, seed=seed))
    gen = Generator(params)
    cols = {d: s.columns for d, s in schemas_of(params).items()}
    rg = int(params.knobs["row_group_rows"])
    blocks = _blocks(params, rows)
    n_bytes = 0
    with tempfile.TemporaryDirectory(prefix="cctl-bench-") as tmp:
        for d in ("src", "tgt"):
            os.makedirs(os.path.join(tmp, d, "train"))
        t0, c0 = time.perf_counter(), time.process_time()
        for i, (d, n) in enumerate(blocks):
            if write:
                task = ShardTask(i, d, "train", i, n, T0, T0 + 24 * DAY)
                stats = write_shard(tmp, gen, task, cols[d], rg)
                n_bytes += stats["bytes"]
                path = os.path.join(tmp, task.relpath)
                for p in (path, *sidecars(path)):
                    os.remove(p)
            else:
                gen.shard_table(d, "train", i, n, T0, T0 + 24 * DAY, cols[d])
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"seconds": dt, "cpu_seconds": cpu, "rows": float(rows), "bytes": float(n_bytes),
            "rss_mib": peak_rss_mib()}


def _measure(preset: str, rows: int, workers: int, write: bool, seed: int) -> dict[str, float]:
    """Runs the workers in fresh spawned processes, so RSS is the generator's alone."""
    from cctl_rec.datagen.pipeline import light_children

    per = -(-rows // workers)
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"))
    with light_children(), pool:  # the pool spawns on its first submit
        res = list(pool.map(_one_worker, [preset] * workers, [per] * workers, [write] * workers,
                            [seed + i for i in range(workers)]))
    return {"seconds": max(r["seconds"] for r in res),
            "cpu_seconds": max(r["cpu_seconds"] for r in res), "rows": float(per * workers),
            "bytes": sum(r["bytes"] for r in res), "rss_mib": max(r["rss_mib"] for r in res)}


def bench_datagen(preset: str = "small", rows: int = 2_000_000, workers: int = 1,
                  cores: int = 64, seed: int = 0) -> dict[str, Any]:
    """Measures generator throughput.

    Args:
        preset: preset whose id spaces and knobs are used (``meituan`` proves memory stays flat).
        rows: rows to generate per measurement (split over the workers).
        workers: processes; rates are reported per worker.
        cores: core count for the meituan extrapolation (one worker per core).
        seed: dataset seed.

    Returns:
        dict with ``gen_rows_per_s_per_worker``, ``gen_write_rows_per_s_per_worker`` (wall
        clock), the same per CPU second (``gen_rows_per_cpu_s``, ``gen_write_rows_per_cpu_s``),
        ``cpu_share`` (CPU / wall seconds of the slowest worker; below ~0.95 the machine was
        shared and the wall rates understate the generator), ``bytes_per_row``,
        ``peak_rss_mib`` (max over the worker processes, each a fresh spawned interpreter, so
        the caller's own imports do not count: :func:`peak_rss_mib`) and ``meituan_minutes_on_<cores>_cores``
        (gen + write at the wall rate, ideal scaling).
    """
    if workers < 1 or rows < 1:
        raise ValueError(f"workers and rows must be >= 1, got workers={workers} rows={rows}")
    gen = _measure(preset, rows, workers, False, seed)
    full = _measure(preset, rows, workers, True, seed)
    g_rate = gen["rows"] / gen["seconds"] / workers
    w_rate = full["rows"] / full["seconds"] / workers
    rss = max(gen["rss_mib"], full["rss_mib"])
    out = {"preset": preset, "rows": int(full["rows"]), "workers": workers,
           "gen_rows_per_s_per_worker": round(g_rate),
           "gen_write_rows_per_s_per_worker": round(w_rate),
           "gen_rows_per_cpu_s": round(gen["rows"] / workers / gen["cpu_seconds"]),
           "gen_write_rows_per_cpu_s": round(full["rows"] / workers / full["cpu_seconds"]),
           "cpu_share": round(min(gen["cpu_seconds"] / gen["seconds"],
                                  full["cpu_seconds"] / full["seconds"]), 2),
           "bytes_per_row": round(full["bytes"] / full["rows"], 1),
           "peak_rss_mib": round(rss, 1),
           f"meituan_minutes_on_{cores}_cores": round(MEITUAN_ROWS / (w_rate * cores) / 60, 1)}
    logger.info("datagen bench: %s", out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datagen.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cores", type=int, default=64)
    args = p.parse_args(argv)
    print(json.dumps(bench_datagen(args.preset, args.rows, args.workers, args.cores)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
