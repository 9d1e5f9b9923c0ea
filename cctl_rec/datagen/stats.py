"""Measured statistics of generated shards, mergeable across shards and workers.

Counts are exact sums. Distinct users / items come from a KMV sketch (the ``SKETCH_K`` ids with
the smallest hash per shard): exact when no shard has more than ``SKETCH_K`` distinct ids,
within about 1.5% otherwise; the overlap fractions are the share of sketched ids present in the other
domain (a uniform sample of the distinct ids).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cctl_rec.datagen.hashing import splitmix64

logger = logging.getLogger(__name__)

SKETCH_K = 4096
_SKETCH_SALT = 0x5EED5EED12345678


def sorted_unique(ids: np.ndarray) -> np.ndarray:
    """``np.unique(ids)`` by sorting: numpy 2.4's hash-based ``np.unique`` is ~30x slower on
    250k mostly distinct int64 ids (150 ms vs 5 ms here)."""
    s = np.sort(ids)
    if len(s) < 2:
        return s
    keep = np.empty(len(s), dtype=bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def _sketch(ids: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the up to SKETCH_K distinct ids with the smallest hash, whether ids were dropped)."""
    uniq = sorted_unique(ids.astype(np.int64, copy=False))
    h = splitmix64(uniq, _SKETCH_SALT)
    if len(uniq) <= SKETCH_K:
        return uniq, False
    keep = np.argpartition(h, SKETCH_K - 1)[:SKETCH_K]
    return uniq[keep], True


def _encode(ids: np.ndarray) -> str:
    return base64.b64encode(ids.astype("<i8").tobytes()).decode("ascii")


def _decode(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<i8").astype(np.int64)


def shard_stats(table: pa.Table) -> dict[str, Any]:
    """Counts and id sketches of one shard (JSON-serialisable)."""
    users, users_cut = _sketch(table["user_id"].to_numpy())
    items, items_cut = _sketch(table["item_id"].to_numpy())
    out: dict[str, Any] = {
        "rows": table.num_rows,
        "positives": int(pc.sum(table["label"]).as_py() or 0),
        "user_in_other_rows": int(pc.sum(table["user_in_other"].cast(pa.int64())).as_py() or 0),
        "item_in_other_rows": int(pc.sum(table["item_in_other"].cast(pa.int64())).as_py() or 0),
        "seq_items": int(pc.sum(pc.list_value_length(table["seq"])).as_py() or 0),
        "other_seq_items": int(pc.sum(pc.list_value_length(table["other_seq"])).as_py() or 0),
        "users_sketch": _encode(users), "users_sketch_truncated": users_cut,
        "items_sketch": _encode(items), "items_sketch_truncated": items_cut,
    }
    if "is_harmful" in table.column_names:
        out["harmful_rows"] = int(pc.sum(table["is_harmful"].cast(pa.int64())).as_py() or 0)
    return out


def _distinct(shards: list[dict[str, Any]], entity: str, lo: int, hi: int) -> tuple[int, float]:
    """(distinct count estimate, share of distinct ids in [lo, hi)) from merged sketches."""
    parts = [_decode(s[f"{entity}_sketch"]) for s in shards]
    if not parts:
        return 0, 0.0
    ids = sorted_unique(np.concatenate(parts))
    h = splitmix64(ids, _SKETCH_SALT)
    if not any(s[f"{entity}_sketch_truncated"] for s in shards):  # every id is here: exact
        kept, n = ids, len(ids)
    else:
        order = np.argsort(h)[:SKETCH_K]
        kept = ids[order]
        kth = float(h[order[-1]]) / 2.0 ** 64
        n = int(round((SKETCH_K - 1) / kth))
    share = float(((kept >= lo) & (kept < hi)).mean()) if len(kept) else 0.0
    return n, share


def merge_stats(shards: dict[str, list[dict[str, Any]]], params: Any,
                harmful_categories: list[int]) -> dict[str, Any]:
    """Manifest ``stats`` from per-shard stats grouped by split key (``tgt/train`` ...).

    Args:
        shards: split key -> the shard stats of that split.
        params: the run's :class:`~datagen.presets.GenParams`.
        harmful_categories: the source's harmful categories (reported, for analysis).
    """
    rows = {k: sum(s["rows"] for s in v) for k, v in shards.items()}
    pos = {k: sum(s["positives"] for s in v) for k, v in shards.items()}
    out: dict[str, Any] = {
        "rows": rows,
        "ctr": {k: round(pos[k] / rows[k], 6) if rows[k] else None for k in rows},
        "harmful_categories": [int(c) for c in harmful_categories],
    }
    for d in ("tgt", "src"):
        other = params.domain("src" if d == "tgt" else "tgt")
        ss = [s for k, v in shards.items() if k.startswith(d + "/") for s in v]
        n = sum(s["rows"] for s in ss)
        users, u_share = _distinct(ss, "users", other.user_start, other.user_start + other.users)
        items, i_share = _distinct(ss, "items", other.item_start, other.item_start + other.items)
        out[d] = {
            "rows": n,
            "ctr": round(sum(s["positives"] for s in ss) / n, 6) if n else None,
            "users": users, "items": items,
            "users_in_other": round(u_share, 6), "items_in_other": round(i_share, 6),
            "rows_user_in_other": round(sum(s["user_in_other_rows"] for s in ss) / n, 6) if n else None,
            "rows_item_in_other": round(sum(s["item_in_other_rows"] for s in ss) / n, 6) if n else None,
            "mean_seq_len": round(sum(s["seq_items"] for s in ss) / n, 3) if n else None,
            "mean_other_seq_len": round(sum(s["other_seq_items"] for s in ss) / n, 3) if n else None,
        }
    src_rows = out["src"]["rows"]
    harmful = sum(s.get("harmful_rows", 0) for k, v in shards.items() if k.startswith("src/") for s in v)
    out["src"]["harmful_share"] = round(harmful / src_rows, 6) if src_rows else None
    # Paper Table 1 reading: share of the target's users / items that also exist in the source.
    out["user_overlap"] = out["tgt"]["users_in_other"]
    out["item_overlap"] = out["tgt"]["items_in_other"]
    return out
