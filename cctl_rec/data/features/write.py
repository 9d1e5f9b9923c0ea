"""Writing a prepared dataset: the output directory, Parquet shards of N rows (temp name, then
rename), stale shards of an earlier run removed. The manifest is written last by
:func:`cctl_rec.data.features.prepare.prepare`."""

from __future__ import annotations

import io
import os
from typing import Any, Optional

import pyarrow as pa
import pyarrow.parquet as pq
from iopath.common.file_io import g_pathmgr

from cctl_rec.data.manifest import MANIFEST, atomic_write_bytes, file_size, join, read_manifest, sha256_file

PRESET_PREFIX = "features/"
"""The manifest's ``preset`` of a prepared dataset (``features/<config name>``)."""
ROW_GROUP_ROWS = 16_384


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue()


def prepare_output(out: str, raw_files: list[str]) -> None:
    """Creates ``out``; refuses one that holds raw input or another kind of dataset; removes the
    manifest of an earlier prepare first (a run that stops leaves no finished-looking dataset)."""
    root = os.path.realpath(out) if "://" not in out else None  # a URL cannot hold the (local) raw input
    for p in raw_files if root is not None else ():
        if os.path.realpath(p).startswith(root + os.sep):
            raise ValueError(f"--out {out} holds the raw input {p}; preparing would overwrite it; use another --out")
    path = join(out, MANIFEST)
    if g_pathmgr.exists(path):
        try:
            old: Optional[dict[str, Any]] = read_manifest(out)
        except ValueError:
            old = None
        if old is None or not str(old.get("preset", "")).startswith(PRESET_PREFIX):
            what = f"preset {old['preset']!r}" if old else "an unreadable manifest"
            raise ValueError(f"--out {out} holds another dataset ({what}); preparing would overwrite it; use a new "
                             f"--out or empty it")
        g_pathmgr.rm(path)
    try:
        g_pathmgr.mkdirs(out)
    except OSError as e:
        raise ValueError(f"--out {out} is not writable: {e.strerror or e}") from None


class ShardWriter:
    """Buffers one split's mapped tables and writes ``part-NNNNN.parquet`` shards of ``shard_rows``."""

    def __init__(self, out: str, key: str, shard_rows: int) -> None:
        self.out, self.key, self.shard_rows = out, key, shard_rows
        self.buf: list[pa.Table] = []
        self.have = 0
        self.entries: list[dict[str, Any]] = []
        g_pathmgr.mkdirs(join(out, *key.split("/")))

    def add(self, t: pa.Table) -> None:
        self.buf.append(t)
        self.have += t.num_rows
        while self.have >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        t = pa.concat_tables(self.buf)
        part, rest = t.slice(0, n), t.slice(n)
        rel = f"{self.key}/part-{len(self.entries):05d}.parquet"
        path = join(self.out, *rel.split("/"))
        atomic_write_bytes(path, parquet_bytes(part))
        self.entries.append({"path": rel, "rows": part.num_rows, "sha256": sha256_file(path), "bytes": file_size(path)})
        self.buf, self.have = ([rest] if rest.num_rows else []), rest.num_rows

    def close(self) -> list[dict[str, Any]]:
        if self.have or not self.entries:
            self._flush(self.have)
        return self.entries


def remove_stale(out: str, keep: set[str]) -> None:
    for key in ("tgt/train", "tgt/valid", "tgt/test", "src/train"):
        full = join(out, *key.split("/"))
        if not g_pathmgr.exists(full):
            continue
        for name in g_pathmgr.ls(full):
            if (name.startswith("part-") and f"{key}/{name}" not in keep) or (name.startswith(".") and ".tmp-" in name):
                g_pathmgr.rm(join(full, name))
