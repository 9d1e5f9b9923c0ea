"""Raw two-domain Parquet logs for the feature-config tests (``cctl-rec prepare``).

- :func:`raw_from_converted`: a converted dataset (``cctl-rec convert amazon``) turned back into
  raw logs: reviewer ids and ASINs as strings (through the converter's ``maps/``), sequences as
  lists of ASINs, no REN masks, no context: what a team would hold before cctl-rec.
- :func:`raw_from_tiny`: the micro synthetic dataset (tests/tinydata.py) as raw logs with int64
  ids, string cities, a dense column, nulls and a null list.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SPLITS = ("tgt/train", "tgt/valid", "tgt/test", "src/train")


def _raw_list(col: pa.ChunkedArray, names: pa.Array) -> pa.Array:
    arr = col.combine_chunks()
    offsets = pa.array(np.concatenate([[0], np.cumsum(pc.list_value_length(arr).to_numpy(zero_copy_only=False))])
                       .astype(np.int32))
    return pa.ListArray.from_arrays(offsets, names.take(pc.list_flatten(arr)))


def raw_from_converted(root: str, out: str) -> str:
    """Writes ``out/{tgt/train,tgt/valid,tgt/test,src/train}/part-0.parquet`` with columns
    ``reviewer_id``, ``asin`` (strings), ``history``, ``other_history`` (lists of ASINs),
    ``label`` and ``user_group`` (target), from the converted dataset at ``root``."""
    users = pq.read_table(os.path.join(root, "maps", "users.parquet")).column("raw_id").combine_chunks()
    items = pq.read_table(os.path.join(root, "maps", "items.parquet")).column("raw_id").combine_chunks()
    for split in SPLITS:
        t = pq.read_table(os.path.join(root, split))
        cols = {"reviewer_id": users.take(t.column("user_id").combine_chunks()),
                "asin": items.take(t.column("item_id").combine_chunks()),
                "history": _raw_list(t.column("seq"), items),
                "other_history": _raw_list(t.column("other_seq"), items),
                "label": t.column("label").combine_chunks()}
        if "user_group" in t.column_names:
            cols["user_group"] = t.column("user_group").combine_chunks()
        os.makedirs(os.path.join(out, split), exist_ok=True)
        pq.write_table(pa.table(cols), os.path.join(out, split, "part-0.parquet"))
    return out


def raw_from_tiny(root: str, out: str) -> str:
    """Writes the tinydata dataset at ``root`` as raw logs under ``out`` (one file per split):
    int64 ``uid`` / ``iid`` / ``category`` with 2% nulls, ``city`` as strings (``"c17"``), a dense
    ``price`` (from the brand), ``hist`` (list<int64>, one null list), ``label``; the source
    adds ``gender``."""
    rng = np.random.default_rng(0)
    for split in SPLITS:
        t = pq.read_table(os.path.join(root, split))
        n = t.num_rows
        null = rng.random(n) < 0.02

        def ints(name: str) -> pa.Array:
            v = t.column(name).to_numpy()
            return pa.array(v, pa.int64(), mask=null)

        hist = t.column("seq").combine_chunks()
        hist_py = hist.to_pylist()
        hist_py[0] = None
        cols = {"uid": ints("user_id"), "iid": ints("item_id"), "category": ints("category"),
                "city": pa.array([f"c{int(x) % 30}" for x in t.column("brand").to_numpy()]),
                "price": pa.array(t.column("brand").to_numpy().astype(np.float64) * 1.5 + 3.0),
                "hist": pa.array(hist_py, pa.list_(pa.int64())),
                "label": t.column("label").combine_chunks()}
        if split.startswith("src"):
            cols["gender"] = ints("gender")
        os.makedirs(os.path.join(out, split), exist_ok=True)
        pq.write_table(pa.table(cols), os.path.join(out, split, "part-0.parquet"))
    return out
