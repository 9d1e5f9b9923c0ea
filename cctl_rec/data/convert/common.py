"""What every converter shares: text input, dense ids, the per-user split, behaviour sequences
without leakage, the Parquet tables and the atomic write with the manifest last.

Layout of a converted dataset (format ``cctl-rec/v1``, read by :class:`cctl_rec.data.loader.Dataset`)::

    OUT/tgt/{train,valid,test}/part-00000.parquet   target rows, shuffled (seeded)
    OUT/src/train/part-00000.parquet                source rows, shuffled (seeded)
    OUT/maps/{users,items}.parquet                  raw id -> dense id
    OUT/manifest.json                               schemas, shards (rows, sha256), rules, statistics

Ids: users share ONE dense space across the two domains (sorted raw ids -> ``[0, U)``); items
are disjoint per domain inside one space (target items ``[0, I_t)``, source items
``[I_t, I_t + I_s)``), so both domains' item tables have ``I_t + I_s`` rows: REN looks target ids
up in the source tables; ``item_in_other`` is False everywhere (no item exists in both domains).

Behaviour sequences (no timestamps exist, so "recent" has no meaning): a row ``(u, i)`` of domain
``d`` gets ``seq`` = a seeded random subset of ``P_d(u)`` minus ``i``, where ``P_d(u)`` is the set of
``u``'s **train positives** in ``d``; its size is ``min(max_seq_len, |P_d(u)| - 1)`` for every row
of the user (the same for positive and negative rows, so the length says nothing about the
label). ``other_seq`` = a seeded random subset of ``min(max_seq_len, |P_o(u)|)`` of the user's
train positives in the other domain. Valid and test rows therefore never appear in any sequence,
and no row sees its own item.
"""

from __future__ import annotations

import io
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from iopath.common.file_io import g_pathmgr

from cctl_rec.data.manifest import (FORMAT, MANIFEST, atomic_write_bytes, file_size, join, read_manifest,
                                    sha256_file, write_manifest)
from cctl_rec.schema import DomainSchema, Feature

logger = logging.getLogger(__name__)

TRAIN, VALID, TEST = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")
DOMAIN_CODE = {"src": 1, "tgt": 2}
# Seed purposes (SeedSequence spawn keys): each random decision has its own stream.
_SPLIT, _POOL, _SEQ, _OTHER, _SHUFFLE = 1, 2, 3, 4, 5
NEG_PURPOSE = 6  # seed purpose of sampled negatives (implicit converter)
CONTEXT = "context"
"""The one context feature: the constant 0 (the public data have no context; the model needs a
non-empty context token, and a constant adds no signal that could leak)."""
PRESET_PREFIX = "convert/"
ROW_GROUP_ROWS = 16_384
KEYS_PER_CHUNK = 1 << 22  # floats of random keys drawn at once when sampling sequences


def rng_for(seed: int, purpose: int, *key: int) -> np.random.Generator:
    """A generator for one decision (``purpose``) about one entity (``key``): independent of the
    order in which entities are processed."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(purpose, *key)))


def check_seed(seed: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be an integer >= 0, got {seed!r}")


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# --------------------------------------------------------------------------------------- input
@dataclass(frozen=True)
class Triples:
    """The rows of one ``user item value`` text file, raw string ids, in file order.

    Attributes:
        path: the file.
        users, items: N raw ids (numpy unicode arrays).
        values: N float64 (rating or implicit 1).
        lines: N 1-based line numbers (for messages).
    """

    path: str
    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    lines: np.ndarray

    def __len__(self) -> int:
        return int(self.values.size)


def read_triples(path: str, header: Optional[tuple[str, str, str]], value_name: str, what: str) -> Triples:
    """Reads a whitespace-separated ``user item value`` file.

    Args:
        path: the file (local path or iopath URI).
        header: the expected first line's column names (a ``:type`` suffix, RecBole style, is
            allowed), or None for a file without header.
        value_name: what the third column is called in messages (``rating``, ``value``).
        what: the file's role in messages (``--src``, ``target train`` ...).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: empty file, wrong header, a line without exactly 3 columns, a non-numeric
            or non-finite value; the message names the file, the line and the value.
    """
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    if g_pathmgr.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory; expected a file of "
                                f"'user item {value_name}' lines")
    with g_pathmgr.open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} file {path} is not UTF-8 text (byte {e.start}); expected "
                         f"'user item {value_name}' lines") from None
    lines = text.splitlines()
    want = f"user item {value_name}"
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    if not numbered:
        raise ValueError(f"{what} file {path} is empty; expected "
                         f"{'a header ' + repr(' '.join(header)) + ' and ' if header else ''}"
                         f"'{want}' lines")
    if header is not None:
        n, first = numbered[0]
        names = tuple(c.split(":", 1)[0] for c in first.split())
        if names != header:
            raise ValueError(f"{what} file {path} line {n}: header {first.strip()!r}, expected the "
                             f"columns {' '.join(header)} (tab-separated)")
        numbered = numbered[1:]
        if not numbered:
            raise ValueError(f"{what} file {path} has a header but no rows; expected '{want}' lines")
    users, items, values, nums = [], [], [], []
    for n, ln in numbered:
        parts = ln.split()
        if len(parts) != 3:
            raise ValueError(f"{what} file {path} line {n}: {len(parts)} column(s) in {ln.strip()!r}, "
                             f"expected 3 ({want})")
        try:
            v = float(parts[2])
        except ValueError:
            raise ValueError(f"{what} file {path} line {n}: {value_name} {parts[2]!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{what} file {path} line {n}: {value_name} {parts[2]!r} is not finite")
        users.append(parts[0])
        items.append(parts[1])
        values.append(v)
        nums.append(n)
    return Triples(path, np.array(users, dtype=str), np.array(items, dtype=str),
                   np.array(values, dtype=np.float64), np.array(nums, dtype=np.int64))


def input_record(path: str) -> dict[str, Any]:
    """Provenance of an input file for the manifest: path, bytes, sha256."""
    return {"path": os.path.abspath(path) if "://" not in path else path, "bytes": file_size(path),
            "sha256": sha256_file(path)}


@dataclass(frozen=True)
class Pairs:
    """Unique (user, item) pairs with the mean of their duplicates' values, sorted by raw ids."""

    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    duplicates: int
    """Rows removed: rows in - pairs out."""


def dedupe_mean(t: Triples) -> Pairs:
    """One row per (user, item): the mean value of its duplicates."""
    if len(t) == 0:
        return Pairs(t.users, t.items, t.values, 0)
    uu, ui = np.unique(t.users, return_inverse=True)
    iu, ii = np.unique(t.items, return_inverse=True)
    key = ui.astype(np.int64) * len(iu) + ii.astype(np.int64)
    _, first, inv, counts = np.unique(key, return_index=True, return_inverse=True, return_counts=True)
    mean = np.bincount(inv, weights=t.values) / counts
    return Pairs(t.users[first], t.items[first], mean, len(t) - len(first))


# ----------------------------------------------------------------------------------------- ids
@dataclass(frozen=True)
class IdSpace:
    """Dense ids: one user space shared by both domains, per-domain item ranges in one space.

    Args:
        users: sorted unique raw user ids of both domains (dense id = position).
        tgt_items, src_items: sorted unique raw item ids of each domain; target items get
            ``[0, I_t)``, source items ``[I_t, I_t + I_s)``.
    """

    users: np.ndarray
    tgt_items: np.ndarray
    src_items: np.ndarray

    @staticmethod
    def build(src_users: np.ndarray, tgt_users: np.ndarray, src_items: np.ndarray,
              tgt_items: np.ndarray) -> "IdSpace":
        return IdSpace(np.union1d(src_users, tgt_users), np.unique(tgt_items), np.unique(src_items))

    @property
    def n_users(self) -> int:
        return int(self.users.size)

    @property
    def n_items(self) -> int:
        return int(self.tgt_items.size + self.src_items.size)

    def item_range(self, domain: str) -> tuple[int, int]:
        nt = int(self.tgt_items.size)
        return (0, nt) if domain == "tgt" else (nt, nt + int(self.src_items.size))

    def user_ids(self, raw: np.ndarray) -> np.ndarray:
        return _lookup(self.users, raw)

    def item_ids(self, domain: str, raw: np.ndarray) -> np.ndarray:
        table = self.tgt_items if domain == "tgt" else self.src_items
        return _lookup(table, raw) + self.item_range(domain)[0]

    def maps(self) -> dict[str, pa.Table]:
        """The raw -> dense tables written under ``maps/``."""
        lo, _ = self.item_range("src")
        return {
            "users": pa.table({"raw_id": pa.array(self.users.tolist(), pa.string()),
                               "user_id": pa.array(np.arange(self.n_users), pa.int64())}),
            "items": pa.table({
                "raw_id": pa.array(self.tgt_items.tolist() + self.src_items.tolist(), pa.string()),
                "domain": pa.array(["tgt"] * self.tgt_items.size + ["src"] * self.src_items.size, pa.string()),
                "item_id": pa.array(np.arange(self.n_items), pa.int64())}),
        }


def _lookup(sorted_ids: np.ndarray, raw: np.ndarray) -> np.ndarray:
    pos = np.searchsorted(sorted_ids, raw)
    if raw.size and (pos.max() >= sorted_ids.size or not np.array_equal(sorted_ids[pos], raw)):
        raise AssertionError("an id is missing from the id space")  # internal invariant
    return pos.astype(np.int64)


def id_schemas(n_users: int, n_items: int) -> dict[str, DomainSchema]:
    """The converted data's schema, the same in both domains: user token ``user_id`` + ``seq``
    (over the item table), item token ``item_id``, context token ``context`` (constant 0)."""

    def schema(domain: str) -> DomainSchema:
        return DomainSchema(domain, (
            Feature("user_id", "user", n_users, "user_id"),
            Feature("seq", "user", n_items, "item_id"),
            Feature("item_id", "item", n_items, "item_id"),
            Feature(CONTEXT, "context", 1, CONTEXT),
        ))

    return {"src": schema("src"), "tgt": schema("tgt")}


# -------------------------------------------------------------------------------------- domain
@dataclass
class Domain:
    """One domain's rows in dense ids, sorted by (user, item, label).

    Attributes:
        name: ``src`` or ``tgt``.
        user, item: N int64 dense ids.
        label: N int8 in {0, 1}.
        split: N int8: TRAIN, VALID or TEST (the source is all TRAIN).
        sampled: N bool: a sampled negative (implicit data), not an observed row.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    split: np.ndarray
    sampled: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.user.size
        if self.sampled is None:
            self.sampled = np.zeros(n, dtype=bool)
        order = np.lexsort((self.label, self.item, self.user))
        for name in ("user", "item", "label", "split", "sampled"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name)[order]))

    def __len__(self) -> int:
        return int(self.user.size)


def user_groups(user: np.ndarray) -> list[np.ndarray]:
    """Row indices per user, users ascending, rows in their current order."""
    if user.size == 0:
        return []
    order = np.argsort(user, kind="stable")
    cuts = np.flatnonzero(np.diff(user[order])) + 1
    return np.split(order, cuts)


def per_user_split(user: np.ndarray, valid_frac: float, test_frac: float, seed: int, domain: str
                   ) -> np.ndarray:
    """Seeded per-user hold-out: each user's rows in a seeded random order; the first
    ``round(test_frac * n)`` go to test, the next ``round(valid_frac * n)`` to valid, the rest
    to train (half rounds up; at least one row stays in train).

    Args:
        user: N dense user ids (rows grouped in any order; the draw depends on the user's rows'
            order, which :class:`Domain` fixes by sorting).
    """
    split = np.full(user.size, TRAIN, dtype=np.int8)
    for g in user_groups(user):
        n = g.size
        n_test, n_valid = round_half_up(test_frac * n), round_half_up(valid_frac * n)
        while n_test + n_valid > n - 1 and n_test + n_valid > 0:  # keep one train row
            if n_valid >= n_test:
                n_valid -= 1
            else:
                n_test -= 1
        if n_test + n_valid == 0:
            continue
        perm = g[rng_for(seed, _SPLIT, DOMAIN_CODE[domain], int(user[g[0]])).permutation(n)]
        split[perm[:n_test]] = TEST
        split[perm[n_test:n_test + n_valid]] = VALID
    return split


def check_fracs(valid_frac: float, test_frac: float) -> None:
    for name, v in (("--valid-frac", valid_frac), ("--test-frac", test_frac)):
        if not (math.isfinite(v) and 0.0 <= v < 1.0):
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if valid_frac + test_frac >= 1.0:
        raise ValueError(f"--valid-frac + --test-frac must be < 1, got {valid_frac} + {test_frac}")


# ----------------------------------------------------------------------------------- sequences
def train_positive_pools(d: Domain, seed: int) -> dict[int, np.ndarray]:
    """user -> the user's train positives in ``d`` (dense item ids), in a seeded order."""
    keep = (d.split == TRAIN) & (d.label == 1)
    users, items = d.user[keep], d.item[keep]
    pools = {}
    for g in user_groups(users):
        u = int(users[g[0]])
        pools[u] = items[g][rng_for(seed, _POOL, DOMAIN_CODE[d.name], u).permutation(g.size)]
    return pools


def sample_sequences(user: np.ndarray, item: np.ndarray, pools: dict[int, np.ndarray], max_len: int,
                     leave_one_out: bool, seed: int, purpose: int, domain: str) -> pa.ListArray:
    """One list<int64> per row: a seeded random subset of the row user's pool.

    With ``leave_one_out`` the row's own item is never chosen and every row of a user gets
    ``min(max_len, |pool| - 1)`` items (positive and negative rows alike); without it,
    ``min(max_len, |pool|)``. Chosen items keep the pool's (seeded) order.
    """
    n = user.size
    lengths = np.zeros(n, dtype=np.int64)
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    for g in user_groups(user):
        u = int(user[g[0]])
        pool = pools.get(u)
        if pool is None:
            continue
        k = min(max_len, pool.size - (1 if leave_one_out else 0))
        if k <= 0:
            continue
        rng = rng_for(seed, purpose, DOMAIN_CODE[domain], u)
        step = max(1, KEYS_PER_CHUNK // pool.size)
        for lo in range(0, g.size, step):
            rows = g[lo:lo + step]
            keys = rng.random((rows.size, pool.size))          # R X |pool|
            if leave_one_out:
                keys[item[rows][:, None] == pool[None, :]] = 2.0  # never among the k smallest
            pick = np.sort(np.argpartition(keys, k - 1, axis=1)[:, :k], axis=1)
            blocks.append((rows, pool[pick]))                   # R X k
        lengths[g] = k
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.int64)
    for rows, chosen in blocks:
        pos = offsets[rows][:, None] + np.arange(chosen.shape[1])[None, :]
        values[pos] = chosen
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int64()).cast(pa.int32()), pa.array(values, pa.int64()))


# -------------------------------------------------------------------------------------- tables
def domain_tables(d: Domain, other: Domain, seed: int, max_len: int) -> dict[str, pa.Table]:
    """The Parquet tables of one domain's splits (``train``, and ``valid``/``test`` when it has
    rows there), rows shuffled with a seeded permutation per split."""
    own_pools = train_positive_pools(d, seed)
    other_pools = train_positive_pools(other, seed)
    seq = sample_sequences(d.user, d.item, own_pools, max_len, True, seed, _SEQ, d.name)
    other_seq = sample_sequences(d.user, d.item, other_pools, max_len, False, seed, _OTHER, d.name)
    other_users = np.unique(other.user[other.split == TRAIN])
    table = pa.table({
        "user_id": pa.array(d.user, pa.int64()),
        "seq": seq,
        "item_id": pa.array(d.item, pa.int64()),
        CONTEXT: pa.array(np.zeros(len(d), dtype=np.int64), pa.int64()),
        "label": pa.array(d.label, pa.int8()),
        "other_seq": other_seq,
        "user_in_other": pa.array(np.isin(d.user, other_users), pa.bool_()),
        "item_in_other": pa.array(np.zeros(len(d), dtype=bool), pa.bool_()),
    })
    out = {}
    for code, name in enumerate(SPLIT_NAMES):
        idx = np.flatnonzero(d.split == code)
        if idx.size == 0:
            continue
        idx = idx[rng_for(seed, _SHUFFLE, DOMAIN_CODE[d.name], code).permutation(idx.size)]
        out[f"{d.name}/{name}"] = table.take(pa.array(idx, pa.int64()))
    return out


def check_no_leakage(tables: dict[str, pa.Table]) -> None:
    """Raises RuntimeError when a row's ``seq`` holds its own item, a row's ``seq`` or
    ``other_seq`` holds an item its user has in a target valid/test row, or a (user, item) pair
    is in two target splits. An internal invariant of the converters (a real check, not ``assert``)."""

    def keys(t: pa.Table) -> np.ndarray:
        return (t.column("user_id").to_numpy().astype(np.int64) << 32) | t.column("item_id").to_numpy()

    tgt = [k for k in ("tgt/train", "tgt/valid", "tgt/test") if k in tables]
    for a_i, a in enumerate(tgt):
        for b in tgt[a_i + 1:]:
            both = np.intersect1d(keys(tables[a]), keys(tables[b]))
            if both.size:
                raise RuntimeError(f"leakage: target pair (user {both[0] >> 32}, item {both[0] & 0xFFFFFFFF}) "
                                   f"is in {a} and {b}")
    held = np.unique(np.concatenate([keys(tables[k]) for k in ("tgt/valid", "tgt/test") if k in tables]
                                    or [np.empty(0, np.int64)]))
    for split, t in tables.items():
        users = t.column("user_id").to_numpy().astype(np.int64)
        items = t.column("item_id").to_numpy()
        for col in ("seq", "other_seq"):
            c = t.column(col).combine_chunks()
            row = np.repeat(np.arange(users.size), c.value_lengths().to_numpy(zero_copy_only=False))
            vals = c.flatten().to_numpy().astype(np.int64)
            if col == "seq" and np.any(vals == items[row]):
                raise RuntimeError(f"leakage: a {split} row's seq holds its own item")
            bad = np.isin((users[row] << 32) | vals, held)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise RuntimeError(f"leakage: a {split} row's {col} holds user {users[row[j]]}'s held-out "
                                   f"target item {vals[j]}")


# ------------------------------------------------------------------------------------ statistics
def split_stats(t: pa.Table) -> dict[str, Any]:
    """Rows, users, items, positives, CTR and sequence coverage of one split's table."""
    y = t.column("label").to_numpy()
    seq_len = t.column("seq").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    other_len = t.column("other_seq").combine_chunks().value_lengths().to_numpy(zero_copy_only=False)
    n = max(1, t.num_rows)
    return {
        "rows": t.num_rows,
        "users": int(np.unique(t.column("user_id").to_numpy()).size),
        "items": int(np.unique(t.column("item_id").to_numpy()).size),
        "positives": int(y.sum()),
        "ctr": round(float(y.sum()) / n, 6),
        "seq_len_mean": round(float(seq_len.sum()) / n, 4),
        "seq_empty_share": round(float((seq_len == 0).sum()) / n, 6),
        "other_seq_share": round(float((other_len > 0).sum()) / n, 6),
        "user_in_other_share": round(float(t.column("user_in_other").to_numpy(zero_copy_only=False).sum()) / n, 6),
    }


def dataset_stats(src: Domain, tgt: Domain, ids: IdSpace, tables: dict[str, pa.Table]) -> dict[str, Any]:
    """Measured statistics of the whole dataset (recorded in the manifest)."""
    su, tu = np.unique(src.user), np.unique(tgt.user)
    both = np.intersect1d(su, tu).size
    return {
        "rows": {k: t.num_rows for k, t in sorted(tables.items())},
        "splits": {k: split_stats(t) for k, t in sorted(tables.items())},
        "users": {"src": int(su.size), "tgt": int(tu.size), "both": int(both), "id_space": ids.n_users},
        "items": {"src": int(ids.src_items.size), "tgt": int(ids.tgt_items.size), "id_space": ids.n_items},
        "user_overlap": round(both / max(1, tu.size), 6),
        "item_overlap": 0.0,
        "ctr": {"src": round(float(src.label.mean()) if len(src) else 0.0, 6),
                "tgt": round(float(tgt.label.mean()) if len(tgt) else 0.0, 6)},
        "leakage_check": "passed",
    }


# ---------------------------------------------------------------------------------------- write
def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    return sink.getvalue()


def prepare_output(out: str) -> None:
    """Creates ``out``; refuses a directory holding another kind of dataset; removes the
    manifest of an earlier conversion first, so an interrupted run leaves no finished-looking
    dataset behind."""
    path = join(out, MANIFEST)
    if g_pathmgr.exists(path):
        try:
            old = read_manifest(out)
        except ValueError:
            old = None
        if old is None or not str(old.get("preset", "")).startswith(PRESET_PREFIX):
            what = f"preset {old['preset']!r}" if old else "an unreadable manifest"
            raise ValueError(f"--out {out} holds another dataset ({what}); converting would overwrite it; "
                             f"use a new --out or empty it")
        g_pathmgr.rm(path)
    try:
        g_pathmgr.mkdirs(out)
    except OSError as e:
        raise ValueError(f"--out {out} is not writable: {e.strerror or e}") from None


def _remove_stale(out: str, keep: set[str]) -> None:
    """Removes part files (and temp files) of an earlier conversion that this one did not write."""
    for d in ("tgt/train", "tgt/valid", "tgt/test", "src/train"):
        full = join(out, *d.split("/"))
        if not g_pathmgr.exists(full):
            continue
        for name in g_pathmgr.ls(full):
            rel = f"{d}/{name}"
            stale_part = name.startswith("part-") and name.endswith(".parquet") and rel not in keep
            if stale_part or (name.startswith(".") and ".tmp-" in name):
                g_pathmgr.rm(join(full, name))


def write_dataset(out: str, tables: dict[str, pa.Table], schemas: dict[str, DomainSchema],
                  maps: dict[str, pa.Table], meta: dict[str, Any], shard_rows: int) -> dict[str, Any]:
    """Writes the shards (temp name, then rename), the id maps, then ``manifest.json`` last.

    Args:
        out: dataset root.
        tables: split key (``tgt/train`` ...) -> rows.
        schemas: the two DomainSchemas.
        maps: name -> table written as ``maps/<name>.parquet``.
        meta: the manifest's other keys (split_rule, max_seq_len, preset, params, seed, stats).
        shard_rows: rows per Parquet shard.

    Returns:
        The manifest.
    """
    import cctl_rec

    if shard_rows < 1:
        raise ValueError(f"--shard-rows must be >= 1, got {shard_rows}")
    for key in ("tgt/train", "tgt/valid", "tgt/test", "src/train"):
        if key not in tables or tables[key].num_rows == 0:
            raise ValueError(f"the converted data would have no {key} rows (a user needs at least 5 target "
                             f"rows for one valid/test row at 10%); check the input files and --valid-frac/--test-frac")
    prepare_output(out)
    splits: dict[str, list[dict[str, Any]]] = {}
    for key in ("tgt/train", "tgt/valid", "tgt/test", "src/train"):
        t = tables[key]
        g_pathmgr.mkdirs(join(out, *key.split("/")))
        entries = []
        for s, lo in enumerate(range(0, t.num_rows, shard_rows)):
            rel = f"{key}/part-{s:05d}.parquet"
            path = join(out, *rel.split("/"))
            part = t.slice(lo, shard_rows)
            atomic_write_bytes(path, _parquet_bytes(part))
            entries.append({"path": rel, "rows": part.num_rows, "sha256": sha256_file(path),
                            "bytes": file_size(path)})
        splits[key] = entries
    g_pathmgr.mkdirs(join(out, "maps"))
    map_entries = []
    for name, t in maps.items():
        rel = f"maps/{name}.parquet"
        path = join(out, "maps", f"{name}.parquet")
        atomic_write_bytes(path, _parquet_bytes(t))
        map_entries.append({"path": rel, "rows": t.num_rows, "sha256": sha256_file(path)})
    _remove_stale(out, {e["path"] for v in splits.values() for e in v})
    manifest = {"format": FORMAT, "schema": {d: schemas[d].to_json() for d in ("src", "tgt")},
                "splits": splits, "id_maps": map_entries, "version": cctl_rec.__version__, **meta}
    write_manifest(out, manifest)
    return manifest


def build_and_write(out: str, src: Domain, tgt: Domain, ids: IdSpace, seed: int, max_seq_len: int,
                    shard_rows: int, meta: dict[str, Any], extra_stats: dict[str, Any]) -> dict[str, Any]:
    """Sequences, tables, the leakage check, statistics, and the write; returns the manifest."""
    if max_seq_len < 1:
        raise ValueError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    tables = {**domain_tables(tgt, src, seed, max_seq_len), **domain_tables(src, tgt, seed, max_seq_len)}
    check_no_leakage(tables)
    stats = {**dataset_stats(src, tgt, ids, tables), **extra_stats}
    meta = {**meta, "seed": seed, "max_seq_len": max_seq_len, "stats": stats}
    return write_dataset(out, tables, id_schemas(ids.n_users, ids.n_items), ids.maps(), meta, shard_rows)


SEQUENCE_RULE = (
    "seq of a row (u, i) in domain d: a seeded random subset of P_d(u) without i, P_d(u) = u's train "
    "positives in d (source: all its rows are train), of size min(max_seq_len, |P_d(u)| - 1) for every row of u; "
    "other_seq: a seeded random subset of min(max_seq_len, |P_o(u)|) of u's train positives in the other "
    "domain (empty if none). Valid/test rows never enter a sequence. context: the constant 0. "
    "user_in_other: u has train rows in the other domain; item_in_other: always false (item spaces disjoint)."
)
