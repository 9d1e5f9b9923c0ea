"""Parquet -> KeyedJaggedTensor: rank-partitioned streams of one domain's split.

Rows of a split are taken in file order; rank ``r`` of ``W`` reads the contiguous row range
``[r * N // W, (r + 1) * N // W)`` so every rank yields the same number of batches (collective
embedding lookups need that). Schemas, nulls, id ranges and labels are checked with a one-line
error naming the file, the column and the value: on open from the Parquet footer's statistics
(nothing is read, so a bad file fails before training writes anything), and again on every batch
read (files written without statistics).

Decisions (docs/reliability.md):

- an unknown extra column is ignored with a warning (converters may carry raw fields along); a
  missing or mistyped one fails;
- an id >= its table's size fails: ids are mapped into ``[0, cardinality)`` when the data is
  written (datagen, converters), where the same mapping reaches serving; hashing at read time
  would train on ids the exported model never sees;
- every shard of a split must have the same columns and types.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from iopath.common.file_io import g_pathmgr
from torchrec import KeyedJaggedTensor

from cctl_rec.safe_io import DISK_ERRNOS, first_line, regular_file
from cctl_rec.schema import DomainSchema

logger = logging.getLogger(__name__)

LIST_COLUMNS = ("seq", "other_seq")
BOOL_COLUMNS = ("user_in_other", "item_in_other")
OPTIONAL_COLUMNS = ("is_harmful", "user_group")
"""Non-feature columns a split may carry: ``is_harmful`` (bool, source: ground truth of harm,
synthetic or ``convert --corrupt-frac``), ``user_group`` (int8, target valid/test: 0 warm, 1
cold; ``convert``), read for analysis and the grouped metrics, never model features."""
GROUP_COLUMN = "user_group"


def lookup_rows(schema: DomainSchema) -> dict[str, int]:
    """Feature name -> rows of the embedding table it is looked up in (``schema.tables()``, the
    tables the model builds): the bound its ids are checked against."""
    out = {}
    for _, rows, keys in schema.tables():
        for k in keys:
            out[k[len(schema.prefix):]] = rows
    return out


def _disk_error(e: BaseException) -> bool:
    """An OSError of the machine (full / read-only / failing disk): not the file's fault."""
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


def _open(path: str) -> pq.ParquetFile:
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"data file {path} does not exist")
    if g_pathmgr.isdir(path):
        raise IsADirectoryError(f"data file {path} is a directory; expected a Parquet file")
    regular_file(path, "data file")  # a device or FIFO: opening or reading it may never end
    try:
        return pq.ParquetFile(g_pathmgr.get_local_path(path))
    except (pa.ArrowInvalid, OSError) as e:
        if _disk_error(e):
            raise
        raise ValueError(f"data file {path} is not a readable Parquet file ({first_line(e)}); "
                         f"expected a complete Parquet file (empty, truncated or corrupt?)") from None


open_parquet = _open
"""A Parquet file opened through iopath, with one clear error when it is missing or unreadable."""


def _read_row_group(pf: pq.ParquetFile, rg: int, path: str, columns: Optional[list[str]] = None) -> pa.Table:
    try:
        return pf.read_row_group(rg, columns=columns)
    except (pa.ArrowException, OSError) as e:
        if _disk_error(e):
            raise
        raise ValueError(f"data file {path}: row group {rg} cannot be read ({first_line(e)}); "
                         f"the file is corrupt or truncated") from None


def check_file_schema(path: str, pf: pq.ParquetFile, schema: DomainSchema, with_meta: bool = True) -> None:
    """Raises ValueError when ``path`` lacks a column or has a wrong type; warns on extra columns."""
    arrow = pf.schema_arrow
    need = list(schema.columns) + (["label", "other_seq", "user_in_other", "item_in_other"] if with_meta else [])
    have = set(arrow.names)
    missing = [c for c in need if c not in have]
    if missing:
        raise ValueError(f"data file {path} lacks column(s) {missing} of the {schema.domain} schema "
                         f"(has {sorted(have)}); is it a {'source' if schema.domain == 'tgt' else 'target'} file?")
    for c in schema.dense_columns:
        if c not in have:
            raise ValueError(f"data file {path} lacks the dense column {c!r} of the {schema.domain} schema "
                             f"(has {sorted(have)})")
        if not pa.types.is_floating(arrow.field(c).type):
            raise ValueError(f"data file {path}: dense column {c!r} has type {arrow.field(c).type}, expected float")
    need += schema.dense_columns
    for c in need:
        t = arrow.field(c).type
        if c in schema.dense_columns:
            continue
        if c in LIST_COLUMNS or c in schema.list_columns:
            ok = pa.types.is_list(t) or pa.types.is_large_list(t)
            ok = ok and pa.types.is_integer(t.value_type)
            want = "list<int>"
        elif c in BOOL_COLUMNS:
            ok, want = pa.types.is_boolean(t), "bool"
        else:
            ok, want = pa.types.is_integer(t), "integer"
        if not ok:
            raise ValueError(f"data file {path}: column {c!r} has type {t}, expected {want}")
    for c, want, ok in (("is_harmful", "bool", pa.types.is_boolean), (GROUP_COLUMN, "integer", pa.types.is_integer)):
        if c in have and not ok(arrow.field(c).type):
            raise ValueError(f"data file {path}: column {c!r} has type {arrow.field(c).type}, expected {want}")
    extra = sorted(have - set(need) - {"ts", *OPTIONAL_COLUMNS})
    if extra:
        logger.warning("data file %s: ignoring extra column(s) %s", path, extra)


def check_file_values(path: str, pf: pq.ParquetFile, schema: DomainSchema) -> None:
    """Raises ValueError on null, negative or out-of-range ids and on labels outside {0, 1}, from
    the min / max / null count the footer records per row group (no data is read). Columns
    without statistics are left to the checks on read."""
    card = lookup_rows(schema)
    lists = set(LIST_COLUMNS) | set(schema.list_columns)
    md = pf.metadata
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for j in range(g.num_columns):
            col = g.column(j)
            name = col.path_in_schema.split(".")[0]
            st = col.statistics
            if st is None or (name not in card and name != "label"):
                continue
            if name not in lists and st.has_null_count and st.null_count:
                what = "labels" if name == "label" else "ids"
                raise ValueError(f"data file {path}: column {name!r} has {st.null_count} null value(s) "
                                 f"(row group {rg}); expected {what}")
            if not st.has_min_max or not isinstance(st.min, int):
                continue
            if name == "label":
                if st.min < 0 or st.max > 1:
                    bad = st.min if st.min < 0 else st.max
                    raise ValueError(f"data file {path}: column 'label' has value {bad}; expected 0 or 1")
            else:
                _check_bounds(st.min, st.max, card[name], path, name)


def check_list_bounds(path: str, pf: pq.ParquetFile, column: str, card: int, what: str) -> None:
    """Raises ValueError when the footer statistics of list column ``column`` record an id outside
    ``[0, card)`` (``what`` names the table in the message); no data is read."""
    md = pf.metadata
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for j in range(g.num_columns):
            col = g.column(j)
            st = col.statistics
            if col.path_in_schema.split(".")[0] == column and st is not None and st.has_min_max \
                    and isinstance(st.min, int):
                _check_bounds(st.min, st.max, card, path, what)


def check_same_schema(paths: list[str], files: list[pq.ParquetFile]) -> None:
    """Raises ValueError naming the first column in which a shard differs from the first shard
    (rows of several shards are concatenated into one batch, so they must agree)."""
    if not files:
        return
    first = files[0].schema_arrow
    want = {f.name: f.type for f in first}
    for path, pf in zip(paths[1:], files[1:]):
        have = {f.name: f.type for f in pf.schema_arrow}
        for name in sorted(set(want) | set(have)):
            if want.get(name) != have.get(name):
                a = want.get(name, "absent")
                b = have.get(name, "absent")
                raise ValueError(f"data file {path}: column {name!r} is {b} here but {a} in {paths[0]}; "
                                 f"expected every shard of a split to have the same columns and types")


def check_sequence_lengths(path: str, pf: pq.ParquetFile, max_len: int, extra: tuple[str, ...] = ()) -> None:
    """Raises ValueError when a list column (``seq``, ``other_seq``, the ``extra`` ones: multi-valued
    features) holds a list longer than ``max_len`` (reads only the list columns; for
    ``data.long_seq=fail``)."""
    names = [c for c in dict.fromkeys(LIST_COLUMNS + tuple(extra)) if c in pf.schema_arrow.names]
    for rg in range(pf.metadata.num_row_groups):
        t = _read_row_group(pf, rg, path, names)
        for name in names:
            lens = pc.list_value_length(t.column(name)).to_numpy(zero_copy_only=False)
            if lens.size and np.nanmax(lens) > max_len:
                raise ValueError(f"data file {path}: column {name!r} has a sequence of length {int(np.nanmax(lens))}, "
                                 f"longer than data.max_seq_len={max_len} (data.long_seq=fail)")


@dataclass
class DomainRows:
    """One batch of a domain's rows, as numpy arrays/Arrow columns ready for KJT building."""

    table: pa.Table
    path: str

    def __len__(self) -> int:
        return self.table.num_rows


def _list_values(col: pa.ChunkedArray, max_len: int, path: str, name: str, long_seq: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, lengths) of a list column, keeping the newest ``max_len`` items per row."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise ValueError(f"data file {path}: column {name!r} has {arr.null_count} null row(s); expected lists (empty allowed)")
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten()
    if values.null_count:
        raise ValueError(f"data file {path}: column {name!r} holds {values.null_count} null id(s) inside its "
                         f"lists; expected ids")
    values = values.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if lengths.size and lengths.max() > max_len:
        if long_seq == "fail":
            raise ValueError(f"data file {path}: column {name!r} has a sequence of length {int(lengths.max())}, "
                             f"longer than data.max_seq_len={max_len}")
        keep_len = np.minimum(lengths, max_len)
        ends = np.cumsum(lengths)
        starts_keep = np.repeat(ends - keep_len, keep_len)
        within = np.arange(keep_len.sum()) - np.repeat(np.cumsum(keep_len) - keep_len, keep_len)
        values = values[starts_keep + within]
        lengths = keep_len
    return values, lengths


def _int_column(table: pa.Table, name: str, path: str, what: str = "ids") -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"data file {path}: column {name!r} has {col.null_count} null value(s); expected {what}")
    return col.to_numpy().astype(np.int64, copy=False)


def check_range(values: np.ndarray, card: int, path: str, name: str) -> None:
    if values.size == 0:
        return
    _check_bounds(int(values.min()), int(values.max()), card, path, name)


def _check_bounds(lo: int, hi: int, card: int, path: str, name: str) -> None:
    if lo < 0:
        raise ValueError(f"data file {path}: column {name!r} has negative id {lo}; expected ids in [0, {card})")
    if hi >= card:
        raise ValueError(f"data file {path}: column {name!r} has id {hi} >= table size {card}; "
                         f"expected ids in [0, {card}) (the manifest's cardinality; remap ids when "
                         f"converting)")


def column_ids(rows: DomainRows, name: str, card: int, max_seq_len: int, long_seq: str = "truncate",
               is_list: Optional[bool] = None) -> tuple[np.ndarray, np.ndarray]:
    """(values, lengths) of one id column, range-checked against ``card``; list columns (``seq``,
    ``other_seq``, or ``is_list``: a multi-valued feature) are truncated to their newest
    ``max_seq_len`` items."""
    if (name in LIST_COLUMNS) if is_list is None else is_list:
        v, l = _list_values(rows.table.column(name), max_seq_len, rows.path, name, long_seq)
    else:
        v, l = _int_column(rows.table, name, rows.path), np.ones(len(rows), dtype=np.int64)
    check_range(v, card, rows.path, name)
    return v, l


def features(rows: DomainRows, schema: DomainSchema, max_seq_len: int, long_seq: str = "truncate"
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """KJT key -> (values, lengths) of every feature of ``schema``."""
    card = lookup_rows(schema)
    return {key: column_ids(rows, f.name, card[f.name], max_seq_len, long_seq, f.is_list)
            for key, f in zip(schema.keys, schema.features)}


def dense_values(rows: DomainRows, schema: DomainSchema) -> Optional[torch.Tensor]:
    """B X F_dense float32 of the schema's dense columns (``schema.dense`` order), or None when it
    has none. A null, NaN or infinite value fails naming the file and the column (``cctl-rec
    prepare`` writes the train mean for a null)."""
    if not schema.dense:
        return None
    cols = []
    for name in schema.dense_columns:
        col = rows.table.column(name)
        if col.null_count:
            raise ValueError(f"data file {rows.path}: dense column {name!r} has {col.null_count} null value(s); "
                             f"expected finite floats")
        x = col.to_numpy().astype(np.float32, copy=False)
        if not np.isfinite(x).all():
            raise ValueError(f"data file {rows.path}: dense column {name!r} has the value {x[~np.isfinite(x)][0]}; "
                             f"expected finite floats")
        cols.append(x)
    return torch.from_numpy(np.stack(cols, axis=1))


def make_kjt(keys: list[str], parts: list[dict[str, tuple[np.ndarray, np.ndarray]]], sizes: list[int]
             ) -> KeyedJaggedTensor:
    """One KJT stacking row blocks: block ``j`` has ``sizes[j]`` rows and the (values, lengths) of
    ``parts[j]``; a key missing from a block gives empty bags there. No keys (every source
    feature looked up in the target tables, ``model.share_ids``): a KJT without keys whose
    stride is still the rows' count."""
    if not keys:
        empty = torch.zeros(0, dtype=torch.int64)
        return KeyedJaggedTensor(keys=[], values=empty, lengths=empty.clone(), stride=int(sum(sizes)))
    vals, lens = [], []
    for k in keys:
        for part, n in zip(parts, sizes):
            v, l = part.get(k, (np.empty(0, np.int64), np.zeros(n, np.int64)))
            vals.append(v)
            lens.append(l)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.from_numpy(np.concatenate(vals)),
        lengths=torch.from_numpy(np.concatenate(lens)))


def position_features(values: np.ndarray, lengths: np.ndarray, keys: list[str]
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A list column's (values, lengths) -> one single-id feature per position: ``keys[j]`` holds
    each row's ``j``-th item (length 1) or nothing (length 0) past the row's length. Rows longer
    than ``len(keys)`` keep their first ``len(keys)`` items (sequences are already truncated to
    their newest ``max_seq_len``)."""
    starts = np.cumsum(lengths) - lengths
    out = {}
    for j, key in enumerate(keys):
        has = lengths > j
        out[key] = (values[starts[has] + j], has.astype(np.int64))
    return out


def features_kjt(rows: DomainRows, schema: DomainSchema, max_seq_len: int, long_seq: str = "truncate"
                 ) -> KeyedJaggedTensor:
    """KJT of every feature of ``schema`` (keys ``schema.keys``): single ids have length 1,
    ``seq`` and multi-valued features their (truncated) length."""
    return make_kjt(schema.keys, [features(rows, schema, max_seq_len, long_seq)], [len(rows)])


def labels(rows: DomainRows) -> torch.Tensor:
    y = _int_column(rows.table, "label", rows.path, "labels 0 or 1")
    if y.size and (y.min() < 0 or y.max() > 1):
        bad = y[(y < 0) | (y > 1)][0]
        raise ValueError(f"data file {rows.path}: column 'label' has value {int(bad)}; expected 0 or 1")
    return torch.from_numpy(y.astype(np.float32))


def group_column(rows: DomainRows) -> Optional[torch.Tensor]:
    """B int64 user groups (0 warm, 1 cold) of target rows, or None when the file has no
    ``user_group`` column."""
    if GROUP_COLUMN not in rows.table.column_names:
        return None
    g = _int_column(rows.table, GROUP_COLUMN, rows.path, "user groups 0 (warm) or 1 (cold)")
    if g.size and (g.min() < 0 or g.max() > 1):
        bad = g[(g < 0) | (g > 1)][0]
        raise ValueError(f"data file {rows.path}: column {GROUP_COLUMN!r} has value {int(bad)}; expected 0 (warm) "
                         f"or 1 (cold)")
    return torch.from_numpy(g)


def bool_column(rows: DomainRows, name: str) -> torch.Tensor:
    if name not in rows.table.column_names:
        return torch.zeros(len(rows), dtype=torch.bool)
    col = rows.table.column(name)
    if col.null_count:
        raise ValueError(f"data file {rows.path}: column {name!r} has {col.null_count} null value(s)")
    return torch.from_numpy(col.to_numpy(zero_copy_only=False).astype(np.bool_))


class ParquetStream:
    """Batches of one split for one rank.

    Args:
        paths: the split's Parquet files, in order.
        schema: the domain's schema (checked against every file on open).
        batch_size: rows per batch.
        rank, world_size: this rank's share of the rows.
        drop_last: drop the last partial batch (training); keep it for evaluation.
        cycle: restart at the end (the source stream runs as long as the target stream).
        row_counts: rows per file if known (the manifest's), else read from Parquet metadata.

    Example::

        for rows in ParquetStream(paths, schemas["tgt"], 512, rank=0, world_size=2):
            kjt = features_kjt(rows, schemas["tgt"], max_seq_len=20)  # 512 rows
    """

    def __init__(self, paths: list[str], schema: DomainSchema, batch_size: int, rank: int = 0,
                 world_size: int = 1, drop_last: bool = True, cycle: bool = False,
                 with_meta: bool = True) -> None:
        if not paths:
            raise ValueError(f"no data files given for the {schema.domain} stream")
        if batch_size <= 0:
            raise ValueError(f"batch size must be > 0, got {batch_size}")
        self.paths, self.schema, self.batch_size = list(paths), schema, batch_size
        self.drop_last, self.cycle = drop_last, cycle
        self.files = [_open(p) for p in self.paths]
        for p, pf in zip(self.paths, self.files):
            check_file_schema(p, pf, schema, with_meta)
        check_same_schema(self.paths, self.files)
        self.file_rows = [pf.metadata.num_rows for pf in self.files]
        self.metadata = [pf.metadata for pf in self.files]
        for pf in self.files:  # an open file keeps what it has read (MBs): reopened while its rows are read
            pf.close()
        self.files = []
        total = sum(self.file_rows)
        per = total // world_size
        where = os.path.dirname(self.paths[0]) or self.paths[0]
        if per == 0:
            raise ValueError(f"the {schema.domain} files in {where} hold {total} rows: too few for {world_size} "
                             f"rank(s); expected at least one row per rank")
        if drop_last and per < batch_size:
            raise ValueError(f"the {schema.domain} files in {where} give {per} rows per rank over {world_size} "
                             f"rank(s), fewer than one batch of {batch_size}; lower data.batch_size or use fewer ranks")
        self.start, self.stop = rank * per, (rank + 1) * per

    @property
    def rows_per_rank(self) -> int:
        return self.stop - self.start

    def num_batches(self) -> int:
        n = self.rows_per_rank
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _chunks(self, skip: int = 0) -> Iterator[tuple[pa.RecordBatch, str]]:
        offset, start = 0, self.start + skip
        for path, meta, n in zip(self.paths, self.metadata, self.file_rows):
            if offset + n <= start:
                offset += n
                continue
            if offset >= self.stop:
                return
            pf = _open(path)
            try:
                for rg in range(meta.num_row_groups):
                    rg_rows = meta.row_group(rg).num_rows
                    lo, hi = max(start, offset), min(self.stop, offset + rg_rows)
                    if lo < hi:
                        rb = _read_row_group(pf, rg, path)
                        yield rb.slice(lo - offset, hi - lo), path
                    offset += rg_rows
                    if offset >= self.stop:
                        return
            finally:
                pf.close()

    def _once(self, skip: int = 0) -> Iterator[DomainRows]:
        buf: list[pa.Table] = []
        have, path = 0, self.paths[0]
        for chunk, path in self._chunks(skip):
            buf.append(chunk)
            have += chunk.num_rows
            while have >= self.batch_size:
                table = pa.concat_tables(buf) if len(buf) > 1 else buf[0]
                yield DomainRows(table.slice(0, self.batch_size), path)
                rest = table.slice(self.batch_size)
                buf, have = ([rest] if rest.num_rows else []), rest.num_rows
        if have and not self.drop_last:
            yield DomainRows(pa.concat_tables(buf), path)

    def __iter__(self) -> Iterator[DomainRows]:
        return self.iterate()

    def iterate(self, skip_rows: int = 0) -> Iterator[DomainRows]:
        """Batches from ``skip_rows`` rows into this rank's range (wrapping when cycling): the
        read position a resumed run continues from."""
        skip = skip_rows % self.rows_per_rank if self.cycle else skip_rows
        while True:
            yield from self._once(skip)
            skip = 0
            if not self.cycle:
                return
