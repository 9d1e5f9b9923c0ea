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
_THIN, _COLD, _CORRUPT = 7, 8, 9
GROUP_COLUMN = "user_group"
"""int8 column of the target rows (every split): the row's user group, for the grouped
valid/test metrics."""
GROUP_NAMES = ("warm", "cold")
"""``user_group`` code -> name (0 warm, 1 cold)."""
HARMFUL_COLUMN = "is_harmful"
CORRUPT_MODES = ("label", "item")
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
    """The rows of one ``user item value [timestamp]`` text file, raw string ids, in file order.

    Attributes:
        path: the file.
        users, items: N raw ids (numpy unicode arrays).
        values: N float64 (rating or implicit 1).
        lines: N 1-based line numbers (for messages).
        timestamps: the file has a fourth (timestamp) column; checked to be numeric, otherwise
            ignored (no converter orders by time: see ``docs/data.md``).
        header: the file starts with a header line.
    """

    path: str
    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    lines: np.ndarray
    timestamps: bool = False
    header: bool = False

    def __len__(self) -> int:
        return int(self.values.size)


TIMESTAMP = "timestamp"


def _is_number(x: str) -> bool:
    try:
        float(x)
    except ValueError:
        return False
    return True


def read_triples(path: str, header: Optional[tuple[str, str, str]], value_name: str, what: str) -> Triples:
    """Reads a ``user item value [timestamp]`` file: tab/space-separated, or comma-separated
    when its first line holds a comma (e.g. Amazon's ``ratings_*.csv``).

    A fourth column is a timestamp: it must be a number on every line and is otherwise
    ignored. Every line has the column count of the first row.

    Args:
        path: the file (local path or iopath URI).
        header: the column names a header line must have (a ``:type`` suffix, RecBole style, is
            allowed; a fourth ``timestamp`` column may follow); the first line is a header iff
            its third field is not a number, so a file without one is read too. None: the file
            has no header (a first line that is not data is refused, naming how to drop it).
        value_name: what the third column is called in messages (``rating``, ``value``).
        what: the file's role in messages (``--src``, ``target train`` ...).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: empty file, wrong header, a line without 3 or 4 columns (or another count
            than the first row's), a non-numeric or non-finite value or timestamp; the message
            names the file, the line and the value.
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
    want = f"user item {value_name} [{TIMESTAMP}]"
    numbered = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip()]
    if not numbered:
        raise ValueError(f"{what} file {path} is empty; expected "
                         f"{'a header ' + repr(' '.join(header)) + ' (optional) and ' if header else ''}"
                         f"'{want}' lines")
    sep = "," if "," in numbered[0][1] else None

    def fields(ln: str) -> list[str]:
        return [c.strip() for c in ln.split(sep)] if sep else ln.split()

    n, first = numbered[0]
    first_fields = fields(first)
    has_header = False
    if len(first_fields) >= 3 and not _is_number(first_fields[2]):
        if header is None:
            raise ValueError(f"{what} file {path} line {n}: {value_name} {first_fields[2]!r} is not a number; "
                             f"if line {n} is a header, remove it (these files have none: "
                             f"tail -n +2 FILE > NEW)")
        names = tuple(c.split(":", 1)[0] for c in first_fields)
        if names not in (header, header + (TIMESTAMP,)):
            raise ValueError(f"{what} file {path} line {n}: header {first.strip()!r}, expected the "
                             f"columns {' '.join(header)} [{TIMESTAMP}] (tab-separated), or no header")
        has_header = True
        numbered = numbered[1:]
        if not numbered:
            raise ValueError(f"{what} file {path} has a header but no rows; expected '{want}' lines")
    ncol = len(fields(numbered[0][1]))
    users, items, values, nums = [], [], [], []
    for n, ln in numbered:
        parts = fields(ln)
        if len(parts) not in (3, 4) or len(parts) != ncol:
            like = f" like line {numbered[0][0]}" if len(parts) in (3, 4) else ""
            raise ValueError(f"{what} file {path} line {n}: {len(parts)} column(s) in {ln.strip()!r}, "
                             f"expected {ncol if ncol in (3, 4) else 3} ({want}){like}")
        try:
            v = float(parts[2])
        except ValueError:
            raise ValueError(f"{what} file {path} line {n}: {value_name} {parts[2]!r} is not a number") from None
        if not math.isfinite(v):
            raise ValueError(f"{what} file {path} line {n}: {value_name} {parts[2]!r} is not finite")
        if ncol == 4 and not _is_number(parts[3]):
            raise ValueError(f"{what} file {path} line {n}: {TIMESTAMP} {parts[3]!r} is not a number "
                             f"(a 4th column is read as a timestamp)")
        users.append(parts[0])
        items.append(parts[1])
        values.append(v)
        nums.append(n)
    return Triples(path, np.array(users, dtype=str), np.array(items, dtype=str),
                   np.array(values, dtype=np.float64), np.array(nums, dtype=np.int64), ncol == 4, has_header)


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
        keep: N bool: False on a target train row dropped by the sparsity options. Dropped rows
            are not written and never enter a sequence; they are kept here so that the kept
            rows' ``other_seq`` (drawn from the other domain) is the dense conversion's.
    """

    name: str
    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    split: np.ndarray
    sampled: np.ndarray = field(default=None)  # type: ignore[assignment]
    keep: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        n = self.user.size
        if self.sampled is None:
            self.sampled = np.zeros(n, dtype=bool)
        if self.keep is None:
            self.keep = np.ones(n, dtype=bool)
        order = np.lexsort((self.label, self.item, self.user))
        for name in ("user", "item", "label", "split", "sampled", "keep"):
            setattr(self, name, np.ascontiguousarray(getattr(self, name)[order]))

    def __len__(self) -> int:
        return int(self.user.size)

    def kept(self) -> "Domain":
        """The rows written (``keep``)."""
        if self.keep.all():
            return self
        k = self.keep
        return Domain(self.name, self.user[k], self.item[k], self.label[k], self.split[k], self.sampled[k])


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


# ------------------------------------------------------------------------- sparsity and harm
@dataclass(frozen=True)
class Sparsity:
    """Target sparsity of a conversion (``--tgt-keep-frac``, ``--cold-user-frac``, ``--cold-k``).

    Args:
        keep_frac: share of each target user's train units kept (seeded), at least one.
        cold_user_frac: share of target users (seeded) who keep only ``cold_k`` train units.
        cold_k: train units a cold-start user keeps; without cold-start users, the user group
            rule's bound (cold = at most ``cold_k`` train units after thinning).

    A unit is an observed target train row (with the implicit converter: together with the
    negatives sampled for it).
    """

    keep_frac: float = 1.0
    cold_user_frac: float = 0.0
    cold_k: int = 5

    def __post_init__(self) -> None:
        if not (isinstance(self.keep_frac, (int, float)) and math.isfinite(self.keep_frac)
                and 0.0 < self.keep_frac <= 1.0):
            raise ValueError(f"--tgt-keep-frac must be in (0, 1], got {self.keep_frac}")
        if not (isinstance(self.cold_user_frac, (int, float)) and math.isfinite(self.cold_user_frac)
                and 0.0 <= self.cold_user_frac <= 1.0):
            raise ValueError(f"--cold-user-frac must be in [0, 1], got {self.cold_user_frac}")
        if not isinstance(self.cold_k, int) or isinstance(self.cold_k, bool) or self.cold_k < 0:
            raise ValueError(f"--cold-k must be an integer >= 0, got {self.cold_k!r}")

    def thinning_rule(self) -> str:
        rule = ("target train: all rows kept" if self.keep_frac >= 1.0 else
                f"target train thinned per user, seeded: each user's train units in a seeded order, the first "
                f"max(1, round({self.keep_frac:g} * n)) kept")
        if self.cold_user_frac > 0:
            rule += (f"; cold start: a seeded round({self.cold_user_frac:g} * U) of the U target users keep only "
                     f"the first min({self.cold_k}, kept) of the same order")
        return (rule + "; a unit is an observed train row (implicit: with its sampled negatives); valid/test "
                "rows are the dense conversion's; sequences come from the kept train positives")

    def group_rule(self) -> str:
        if self.cold_user_frac > 0:
            return "user_group 1 (cold) iff the user is one of the cold-start users, else 0 (warm)"
        return (f"user_group 1 (cold) iff the user has at most {self.cold_k} target train units after "
                f"thinning, else 0 (warm)")

    def to_json(self) -> dict[str, Any]:
        return {"tgt_keep_frac": self.keep_frac, "cold_user_frac": self.cold_user_frac, "cold_k": self.cold_k,
                "thinning_rule": self.thinning_rule(), "user_group_rule": self.group_rule()}


def target_sparsity(d: Domain, sp: Sparsity, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Thins the target train rows of ``d`` (rules: :meth:`Sparsity.thinning_rule`).

    Every row of ``d`` is a unit (the implicit converter calls this before it adds the sampled
    negatives, which then follow their positive). Each user's kept rows are a prefix of one
    seeded order of its train rows, so a smaller share keeps a subset of a larger one's rows.

    Returns:
        (keep: N bool, False on the dropped train rows; cold: the sorted user ids of the cold
        group; statistics for the manifest).
    """
    keep = np.ones(len(d), dtype=bool)
    code = DOMAIN_CODE[d.name]
    users = np.unique(d.user)
    chosen = np.empty(0, np.int64)
    if sp.cold_user_frac > 0:
        n_cold = round_half_up(sp.cold_user_frac * users.size)
        chosen = np.sort(rng_for(seed, _COLD, code).permutation(users)[:n_cold])
    chosen_set = set(chosen.tolist())
    tr = np.flatnonzero(d.split == TRAIN)
    for g in user_groups(d.user[tr]):
        rows = tr[g]
        u, n = int(d.user[rows[0]]), rows.size
        k = n if sp.keep_frac >= 1.0 else max(1, round_half_up(sp.keep_frac * n))
        if u in chosen_set:
            k = min(k, sp.cold_k)
        if k < n:
            keep[rows[rng_for(seed, _THIN, code, u).permutation(n)[k:]]] = False
    kept = (d.split == TRAIN) & keep
    per_user = np.bincount(d.user[kept], minlength=int(users.max()) + 1 if users.size else 0)
    cold = chosen if sp.cold_user_frac > 0 else users[per_user[users] <= sp.cold_k]
    stats = {"train_units_dense": int(tr.size), "train_units_kept": int(kept.sum()),
             "cold_start_users": int(chosen.size), "target_users": int(users.size),
             "cold_users": int(cold.size), "warm_users": int(users.size - cold.size)}
    return keep, cold, stats


@dataclass(frozen=True)
class Corruption:
    """Known harm in the source (``--corrupt-frac``, ``--corrupt-mode``).

    Args:
        frac: share of the source rows corrupted (seeded, exactly round(frac * N) rows).
        mode: ``label``: the label flipped; ``item``: the item replaced by a uniformly random
            other source item (the label kept).
    """

    frac: float = 0.0
    mode: str = "label"

    def __post_init__(self) -> None:
        if not (isinstance(self.frac, (int, float)) and math.isfinite(self.frac) and 0.0 <= self.frac <= 1.0):
            raise ValueError(f"--corrupt-frac must be in [0, 1], got {self.frac}")
        if self.mode not in CORRUPT_MODES:
            raise ValueError(f"--corrupt-mode must be one of {', '.join(CORRUPT_MODES)}, got {self.mode!r}")

    def rule(self) -> str:
        what = ("its label flipped" if self.mode == "label" else
                "its item replaced by a uniformly random other source item (label kept)")
        return (f"source: a seeded round({self.frac:g} * N) of the N source rows corrupted, {what}, after the "
                f"sequences were drawn from the clean rows; {HARMFUL_COLUMN} marks them")


def corrupt_source(t: pa.Table, c: Corruption, seed: int, item_range: tuple[int, int]
                   ) -> tuple[pa.Table, dict[str, Any]]:
    """The source table with ``round(c.frac * N)`` seeded rows corrupted and the column
    ``is_harmful`` (bool, not null: the synthetic data's) appended; and its statistics."""
    n = t.num_rows
    k = round_half_up(c.frac * n)
    rng = rng_for(seed, _CORRUPT, DOMAIN_CODE["src"])
    idx = np.sort(rng.permutation(n)[:k])
    harmful = np.zeros(n, dtype=bool)
    harmful[idx] = True
    label = t.column("label").to_numpy().astype(np.int8)
    flipped = int((label[idx] == 1).sum())
    if c.mode == "label":
        label = label.copy()
        label[idx] = 1 - label[idx]
        t = t.set_column(t.schema.get_field_index("label"), "label", pa.array(label, pa.int8()))
    elif k:
        lo, hi = item_range
        if hi - lo < 2:
            raise ValueError(f"--corrupt-mode item needs at least 2 source items to replace one by another, "
                             f"the source has {hi - lo}; use --corrupt-mode label")
        item = t.column("item_id").to_numpy().astype(np.int64)
        new = lo + rng.integers(0, hi - lo - 1, size=k)
        new += new >= item[idx]  # uniform over the source items other than the row's own
        item = item.copy()
        item[idx] = new
        t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(item, pa.int64()))
    t = t.append_column(pa.field(HARMFUL_COLUMN, pa.bool_(), nullable=False), pa.array(harmful, pa.bool_()))
    stats = {"mode": c.mode, "frac": c.frac, "rows": k, "share": round(k / max(1, n), 6),
             "corrupted_positives": flipped, "rule": c.rule()}
    return t, stats


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
def domain_tables(d: Domain, other: Domain, seed: int, max_len: int, cold: Optional[np.ndarray] = None
                  ) -> dict[str, pa.Table]:
    """The Parquet tables of one domain's splits (``train``, and ``valid``/``test`` when it has
    rows there), rows shuffled with a seeded permutation per split. With ``cold`` (sorted user
    ids), the rows get the int8 column ``user_group`` (1: the user is in ``cold``; written on
    every split so the target splits share one schema; evaluated on valid/test).

    Only the kept rows (``Domain.keep``) of both domains are written and enter sequences;
    ``other_seq`` is drawn on every row of ``d`` (kept or not) and then taken, so a kept row gets
    the dense conversion's ``other_seq`` (it holds no row of ``d``'s domain)."""
    other = other.kept()
    other_pools = train_positive_pools(other, seed)
    other_seq = sample_sequences(d.user, d.item, other_pools, max_len, False, seed, _OTHER, d.name)
    if not d.keep.all():
        other_seq = other_seq.take(pa.array(np.flatnonzero(d.keep), pa.int64()))
        d = d.kept()
    own_pools = train_positive_pools(d, seed)
    seq = sample_sequences(d.user, d.item, own_pools, max_len, True, seed, _SEQ, d.name)
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
        part = table.take(pa.array(idx, pa.int64()))
        if cold is not None:
            part = part.append_column(GROUP_COLUMN, pa.array(np.isin(d.user[idx], cold).astype(np.int8), pa.int8()))
        out[f"{d.name}/{name}"] = part
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


def group_stats(tables: dict[str, pa.Table]) -> dict[str, Any]:
    """Rows, users and positives per user group of the target tables."""
    out: dict[str, Any] = {}
    for key in ("tgt/train", "tgt/valid", "tgt/test"):
        t = tables.get(key)
        if t is None or GROUP_COLUMN not in t.column_names:
            continue
        g = t.column(GROUP_COLUMN).to_numpy()
        u, y = t.column("user_id").to_numpy(), t.column("label").to_numpy()
        out[key] = {name: {"rows": int((g == code).sum()), "users": int(np.unique(u[g == code]).size),
                           "positives": int(y[g == code].sum())} for code, name in enumerate(GROUP_NAMES)}
    return out


def build_and_write(out: str, src: Domain, tgt: Domain, ids: IdSpace, seed: int, max_seq_len: int,
                    shard_rows: int, meta: dict[str, Any], extra_stats: dict[str, Any],
                    cold: Optional[np.ndarray] = None, corruption: Optional[Corruption] = None) -> dict[str, Any]:
    """Sequences, tables, the leakage check, the source corruption, statistics, and the write;
    returns the manifest.

    Args:
        cold: sorted user ids of the cold group (``user_group`` 1 on their valid/test rows);
            None: no ``user_group`` column.
        corruption: known harm applied to the source rows after the sequences were drawn from
            the clean rows (and checked); None or frac 0: none, and no ``is_harmful`` column.
    """
    if max_seq_len < 1:
        raise ValueError(f"--max-seq-len must be >= 1, got {max_seq_len}")
    tables = {**domain_tables(tgt, src, seed, max_seq_len, cold), **domain_tables(src, tgt, seed, max_seq_len)}
    check_no_leakage(tables)
    extra_stats = dict(extra_stats)
    if corruption is not None and corruption.frac > 0 and "src/train" in tables:
        tables["src/train"], extra_stats["corruption"] = corrupt_source(tables["src/train"], corruption, seed,
                                                                        ids.item_range("src"))
    stats = {**dataset_stats(src.kept(), tgt.kept(), ids, tables), **extra_stats}
    if "corruption" in extra_stats:  # the stored (corrupted) labels
        stats["ctr"]["src"] = stats["splits"]["src/train"]["ctr"]
    if cold is not None:
        stats.setdefault("user_groups", {}).update(group_stats(tables))
    meta = {**meta, "seed": seed, "max_seq_len": max_seq_len, "stats": stats}
    return write_dataset(out, tables, id_schemas(ids.n_users, ids.n_items), ids.maps(), meta, shard_rows)


SEQUENCE_RULE = (
    "seq of a row (u, i) in domain d: a seeded random subset of P_d(u) without i, P_d(u) = u's train "
    "positives in d (source: all its rows are train), of size min(max_seq_len, |P_d(u)| - 1) for every row of u; "
    "other_seq: a seeded random subset of min(max_seq_len, |P_o(u)|) of u's train positives in the other "
    "domain (empty if none). Valid/test rows never enter a sequence. context: the constant 0. "
    "user_in_other: u has train rows in the other domain; item_in_other: always false (item spaces disjoint)."
)
