"""A micro two-domain dataset for unit tests: a few thousand rows, written in well under a second.

Labels follow a planted rule (user/item parity agreement plus noise), harmful source rows invert
it, so models can learn something; statistics are not meant to be realistic (datagen's are).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cctl_rec.schema import synthetic_schemas

N_USERS, N_ITEMS, N_CAT, N_BRAND = 300, 120, 6, 20


def _rows(rng: np.random.Generator, schema, n: int, harmful_share: float = 0.0) -> pa.Table:
    cols = {}
    users = rng.integers(0, N_USERS, n)
    items = rng.integers(0, N_ITEMS, n)
    for f in schema.features:
        if f.name == "user_id":
            cols[f.name] = users
        elif f.name == "item_id":
            cols[f.name] = items
        elif f.name == "category":
            cols[f.name] = items % N_CAT
        elif f.name != "seq":
            cols[f.name] = rng.integers(0, f.cardinality, n)
    def seqs(maxlen):
        lens = rng.integers(0, maxlen + 1, n)
        return pa.array([list(rng.integers(0, N_ITEMS, k)) for k in lens], type=pa.list_(pa.int64()))
    cols["seq"] = seqs(25)
    cols["other_seq"] = seqs(6)
    cols["user_in_other"] = users < int(N_USERS * 0.7)
    cols["item_in_other"] = items < int(N_ITEMS * 0.7)
    agree = ((users % 2) == (items % 2))
    harmful = (items % N_CAT) < int(round(N_CAT * harmful_share)) if harmful_share else np.zeros(n, bool)
    logit = np.where(agree ^ harmful, 1.5, -1.5) - 1.0
    cols["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    cols["ts"] = np.arange(n, dtype=np.int64)
    if schema.domain == "src":
        cols["is_harmful"] = harmful
    out = {}
    for k, v in cols.items():
        out[k] = v if isinstance(v, pa.Array) else pa.array(v)
    return pa.table(out)


def write_tiny(root: str, n_tgt: int = 4096, n_src: int = 16384, seed: int = 0, files: int = 2) -> str:
    """Writes a dataset root with tgt/{train,valid,test} and src/train splits; returns ``root``."""
    rng = np.random.default_rng(seed)
    schemas = synthetic_schemas(N_USERS, N_ITEMS, N_CAT, N_BRAND, n_cities=30)
    splits = {}
    for split, dom, n in (("tgt/train", "tgt", n_tgt), ("tgt/valid", "tgt", n_tgt // 4),
                          ("tgt/test", "tgt", n_tgt // 4), ("src/train", "src", n_src)):
        entries = []
        for i in range(files):
            rel = f"{split}/part-{i:05d}.parquet"
            os.makedirs(os.path.join(root, split), exist_ok=True)
            t = _rows(rng, schemas[dom], n // files, 0.34 if dom == "src" else 0.0)
            pq.write_table(t, os.path.join(root, rel), row_group_size=1000)
            entries.append({"path": rel, "rows": t.num_rows, "sha256": ""})
        splits[split] = entries
    manifest = {"format": "cctl-rec/v1", "schema": {d: s.to_json() for d, s in schemas.items()},
                "splits": splits, "split_rule": "test fixture", "max_seq_len": 20, "preset": "test",
                "params": {}, "seed": seed, "version": "test", "stats": {}}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)
    return root
