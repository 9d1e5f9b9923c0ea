"""Shards: the plan (which rows and ts range each shard holds) and the atomic, resumable write.

A shard ``D/S/part-NNNNN.parquet`` is written as a hidden temp file in the same directory, renamed,
then followed by two sidecars: ``part-NNNNN.parquet.stats.json`` (counts, sketches, sha256) and,
last, ``part-NNNNN.parquet.sha256``. A shard is complete when its sha256 sidecar exists and
matches the file; anything else is regenerated (the output is a pure function of the seed and
the shard's coordinates, so a regenerated shard is byte-identical).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from iopath.common.file_io import g_pathmgr

from cctl_rec.data.manifest import (atomic_write_bytes, join, replace, sha256_file, temp_name)
from cctl_rec.datagen.generator import DAY, T0, Generator
from cctl_rec.datagen.presets import SPLITS, GenParams
from cctl_rec.datagen.stats import shard_stats

logger = logging.getLogger(__name__)

SPLIT_KEYS = tuple(f"{d}/{s}" for d in ("tgt", "src") for s in SPLITS[d])


@dataclass(frozen=True)
class ShardTask:
    """One output file: ``rows`` rows of ``domain/split`` with ts in ``[ts_lo, ts_hi)``.

    Args:
        index: position in the global plan (``RANK``/``WORLD_SIZE`` split on it).
        domain / split / shard: the file's coordinates (they seed its RNG).
    """

    index: int
    domain: str
    split: str
    shard: int
    rows: int
    ts_lo: int
    ts_hi: int

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.split}"

    @property
    def relpath(self) -> str:
        return f"{self.domain}/{self.split}/part-{self.shard:05d}.parquet"


def split_times(params: GenParams) -> dict[str, tuple[int, int]]:
    """``[lo, hi)`` ts range of each split key; the source lives in the target train range."""
    span = DAY * int(params.knobs["days"])
    edges, acc = [T0], 0.0
    for f in params.knobs["split_fracs"]:
        acc += f
        edges.append(T0 + int(round(span * acc)))
    out = {f"tgt/{s}": (edges[i], edges[i + 1]) for i, s in enumerate(SPLITS["tgt"])}
    out["src/train"] = out["tgt/train"]
    return out


def split_rule(params: GenParams) -> str:
    """The split rule in words (recorded in the manifest)."""
    def day(t: int) -> str:
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M")

    st = split_times(params)
    parts = [f"{k}: ts in [{day(lo)}, {day(hi)}) UTC, {params.domain(k[:3]).split_rows[k[4:]]} rows"
             for k, (lo, hi) in st.items()]
    return ("target rows split by time (ts, seconds since 1970): consecutive ts ranges with "
            f"{'/'.join(str(round(100 * f)) for f in params.knobs['split_fracs'])}% of the "
            "rows for train/valid/test; the source (train only) covers the target train range; "
            "each shard holds a contiguous ts sub-range, rows sorted by ts. " + "; ".join(parts))


def plan(params: GenParams, max_shards: Optional[int] = None) -> list[ShardTask]:
    """Every shard of the dataset in a fixed global order (tgt/train, valid, test, src/train).

    Args:
        params: the run's parameters.
        max_shards: keep at most this many shards per split (for partial trial runs).
    """
    per = int(params.knobs["shard_rows"])
    times = split_times(params)
    tasks: list[ShardTask] = []
    for key in SPLIT_KEYS:
        d, s = key.split("/")
        total = params.domain(d).split_rows[s]
        lo, hi = times[key]
        n = -(-total // per)
        for i in range(n if max_shards is None else min(n, max_shards)):
            r0, r1 = i * per, min(total, (i + 1) * per)
            tasks.append(ShardTask(len(tasks), d, s, i, r1 - r0, lo + (hi - lo) * r0 // total,
                                   lo + (hi - lo) * r1 // total))
    return tasks


class _HashingSink:
    """A write-only file wrapper that hashes and counts what passes through."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size, self.closed = f, hashlib.sha256(), 0, False

    def write(self, b: Any) -> int:
        mv = memoryview(b)
        self.sha.update(mv)
        self.size += mv.nbytes
        self.f.write(mv)
        return mv.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True


def sidecars(final: str) -> tuple[str, str]:
    """(sha256 sidecar, stats sidecar) paths of a shard."""
    return final + ".sha256", final + ".stats.json"


def is_complete(root: str, task: ShardTask, verify: bool = True) -> Optional[dict[str, Any]]:
    """The shard's stats if it is complete (and, with ``verify``, its bytes match), else None."""
    final = join(root, task.relpath)
    sha_path, stats_path = sidecars(final)
    if not (g_pathmgr.exists(sha_path) and g_pathmgr.exists(stats_path) and g_pathmgr.exists(final)):
        return None
    with g_pathmgr.open(sha_path, "r") as f:
        words = f.read().split()
    recorded = words[0] if words else ""
    with g_pathmgr.open(stats_path, "r") as f:
        try:
            stats = json.load(f)
        except json.JSONDecodeError:
            return None
    if stats.get("sha256") != recorded or stats.get("rows") != task.rows:
        return None
    if verify and sha256_file(final) != recorded:
        logger.warning("shard %s does not match its sha256 sidecar; regenerating", task.relpath)
        return None
    return stats


def write_shard(root: str, gen: Generator, task: ShardTask, columns: list[str],
                row_group_rows: int) -> dict[str, Any]:
    """Generates and writes one shard unless it is already complete; returns its stats.

    The returned dict has ``rows``, ``sha256``, ``bytes``, counts, sketches and ``skipped``.
    """
    done = is_complete(root, task)
    if done is not None:
        return {**done, "skipped": True}
    final = join(root, task.relpath)
    sha_path, stats_path = sidecars(final)
    for p in (sha_path, stats_path, final):  # the sha sidecar first: never a stale "done"
        if g_pathmgr.exists(p):
            g_pathmgr.rm(p)
    table = gen.shard_table(task.domain, task.split, task.shard, task.rows, task.ts_lo,
                            task.ts_hi, columns)
    tmp = temp_name(final)
    try:
        with g_pathmgr.open(tmp, "wb") as f:
            sink = _HashingSink(f)
            write_table(table, sink, row_group_rows)
        replace(tmp, final)
    except BaseException:
        if g_pathmgr.exists(tmp):
            g_pathmgr.rm(tmp)
        raise
    stats = {"path": task.relpath, "rows": table.num_rows, "sha256": sink.sha.hexdigest(),
             "bytes": sink.size, **shard_stats(table)}
    atomic_write_bytes(stats_path, json.dumps(stats).encode("utf-8"))
    atomic_write_bytes(sha_path, f"{stats['sha256']}  {task.relpath.rsplit('/', 1)[-1]}\n".encode())
    return {**stats, "skipped": False}


ZSTD_LEVEL = 1
# BYTE_STREAM_SPLIT on integer columns needs parquet-cpp >= 17 (Arrow 17) to write and read
_BSS_INTEGERS = int(pa.__version__.split(".")[0]) >= 17


def column_encodings(schema: pa.Schema) -> dict[str, str]:
    """Parquet column path -> encoding: ``ts`` (sorted) delta-encoded, every other integer
    column (list values included) BYTE_STREAM_SPLIT; booleans keep the default."""
    out = {}
    for f in schema:
        path, t = f.name, f.type
        if pa.types.is_list(t):
            path, t = f"{f.name}.list.element", t.value_type
        if f.name == "ts":
            out[path] = "DELTA_BINARY_PACKED"
        elif pa.types.is_integer(t) and _BSS_INTEGERS:
            out[path] = "BYTE_STREAM_SPLIT"
    return out


def write_table(table: pa.Table, sink: Any, row_group_rows: int) -> None:
    """Parquet (zstd, bounded row groups) into a writable file object.

    Encodings were picked by measurement (``docs/datagen.md``): no dictionaries;
    BYTE_STREAM_SPLIT on the integer columns (ids are int32: the zero high bytes become
    their own streams, which zstd removes almost for free; smaller and about 2x faster than
    dictionary or plain encoding here), ``ts`` delta-encoded, zstd level 1, and no min/max
    statistics for the list columns (nobody prunes on them).
    """
    lists = [f.name for f in table.schema if pa.types.is_list(f.type)]
    with pq.ParquetWriter(sink, table.schema, compression="zstd", compression_level=ZSTD_LEVEL,
                          use_dictionary=False, column_encoding=column_encodings(table.schema),
                          write_statistics=[c for c in table.column_names if c not in lists]
                          ) as w:
        w.write_table(table, row_group_size=row_group_rows)


def clean_temps(root: str, tasks: list[ShardTask]) -> int:
    """Removes leftover temp files of ``tasks`` (from a killed run); returns how many."""
    by_dir: dict[str, set[str]] = {}
    for t in tasks:
        by_dir.setdefault(t.key, set()).add(t.relpath.rsplit("/", 1)[-1])
    removed = 0
    for key, names in by_dir.items():
        d = join(root, *key.split("/"))
        if not g_pathmgr.exists(d):
            continue
        for entry in g_pathmgr.ls(d):
            if entry.startswith(".") and ".tmp-" in entry:
                base = entry[1:].split(".tmp-")[0]
                if base.split(".parquet")[0] + ".parquet" in names:
                    g_pathmgr.rm(join(d, entry))
                    removed += 1
    if removed:
        logger.info("removed %d temp files left by an interrupted run", removed)
    return removed
