"""The resolved feature mapping: a raw domain table -> the dataset's columns. Used by `cctl-rec
prepare` to write the dataset and, loaded back from a prepared dataset, to map raw serving input
the same way (``FeatureMap.load(root).map_features("tgt", table)``).

A prepared dataset records it in ``features/features.json`` (format ``cctl-rec/features-v1``)::

    {"format": "cctl-rec/features-v1",
     "config": <the feature config, resolved>,
     "spaces": {"user": {"kind": "vocab", "dtype": "string", "rows": V + 1,
                         "vocab": {"path": "features/vocab/user.parquet", "sha256": "...", "size": V}},
                "city": {"kind": "hash", "dtype": "int64", "rows": N + 1, "buckets": N, "salt": 0,
                         "algorithm": "<HASH_ALGORITHM>"}},
     "dense": {"tgt": {"price": {"mean": m, "std": s, "normalize": "standard", "column": "price",
                                 "boundaries": [b1, ..., b15], "rows": 17}}}}

Vocabulary files: Parquet ``(raw_id, row, count)``, raw_id int64 or string; row 0 is never listed
(the OOV / null row).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cctl_rec.config import from_dict, to_dict
from cctl_rec.data.features.mapping import HASH_ALGORITHM, VocabIndex, arrow_dtype, hash_rows, normalise_ids
from cctl_rec.data.features.spec import FeatureConfig, FeatureSpec

FORMAT = "cctl-rec/features-v1"
FEATURES_JSON = "features/features.json"
CONTEXT = "context"
"""The constant context feature added to a domain whose config has no context-token feature."""


@dataclass
class SpaceMap:
    """One resolved id space.

    Attributes:
        name, kind (hash | vocab), dtype (int64 | string): as configured / found in the data.
        rows: table rows (buckets + 1, or vocabulary size + 1).
        buckets, salt: hash spaces.
        vocab: vocab spaces: the ids, row ``i + 1`` for ``vocab[i]``.
    """

    name: str
    kind: str
    dtype: str
    rows: int
    buckets: int = 0
    salt: int = 0
    vocab: Optional[pa.Array] = None

    def __post_init__(self) -> None:
        self.index = VocabIndex(self.vocab) if self.vocab is not None else None

    def map(self, arr: pa.Array) -> np.ndarray:
        """N int64 rows in ``[0, rows)`` of a raw id array (cast to this space's dtype)."""
        ids = normalise_ids(arr, self.dtype)
        if self.kind == "hash":
            return hash_rows(ids, self.buckets, self.salt)
        return self.index.rows(ids)


@dataclass
class DenseStat:
    """What the train split says about one dense feature.

    Attributes:
        column: the raw column.
        mean, std: of the train values (std 1 for a constant); ``normalize`` (standard | none)
            applies them to the float column written when the feature is not binned.
        boundaries: the binned feature's sorted inner bin edges (train quantiles, ties merged), or
            None: not binned. A value x is in row ``1 + #(boundaries <= x)``; null is row 0.
    """

    column: str
    mean: float
    std: float
    normalize: str
    boundaries: Optional[tuple[float, ...]] = None

    @property
    def rows(self) -> int:
        """Table rows of a binned feature: its bins + the null row."""
        return len(self.boundaries or ()) + 2

    def values(self, arr: pa.Array, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(N float64 values, N bool null mask); NaN or infinity fails naming ``where``."""
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
        null = np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        bad = ~np.isfinite(x) & ~null
        if bad.any():
            raise ValueError(f"{where}: dense column {self.column!r} has {int(bad.sum())} NaN or infinite value(s) "
                             f"(first {x[bad][0]}); expected finite numbers (null is allowed: it becomes the train mean, "
                             f"or row 0 when binned)")
        return x, null

    def apply(self, arr: pa.Array, where: str) -> pa.Array:
        """N int64 bin rows (binned) or N float32 ``(x - mean) / std`` (or x; a null is the mean)."""
        x, null = self.values(arr, where)
        if self.boundaries is not None:
            rows = np.searchsorted(np.asarray(self.boundaries, np.float64), x, side="right").astype(np.int64) + 1
            rows[null] = 0
            return pa.array(rows, pa.int64())
        x = np.where(null, self.mean, x)
        if self.normalize == "standard":
            x = (x - self.mean) / self.std
        return pa.array(x.astype(np.float32), pa.float32())


def list_rows(col: pa.Array, space: SpaceMap) -> pa.Array:
    """A list column of raw ids -> list<int64> of rows (a null list: empty; a null id: row 0)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if col.null_count:
        col = pc.if_else(col.is_null(), pa.scalar([], col.type), col)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(col) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = space.map(pc.list_flatten(col))
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int64())).cast(pa.list_(pa.int64()))


def empty_lists(n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int64()))


def id_type_ok(t: pa.DataType, kind: str) -> tuple[str, str]:
    """(the raw id dtype of a column of type ``t`` for a feature of ``kind``, or ``""``; what was expected)."""
    if kind == "id_list":
        if pa.types.is_list(t) or pa.types.is_large_list(t):
            return arrow_dtype(t.value_type), "a list of int or string ids"
        return "", "a list of int or string ids"
    return arrow_dtype(t), "int or string ids"


class FeatureMap:
    """A feature config with its resolved spaces and dense statistics.

    Args:
        spec: the validated feature config.
        spaces: space name -> :class:`SpaceMap`.
        dense: domain -> feature name -> :class:`DenseStat`.
    """

    def __init__(self, spec: FeatureConfig, spaces: dict[str, SpaceMap],
                 dense: dict[str, dict[str, DenseStat]]) -> None:
        self.spec, self.spaces, self.dense = spec, spaces, dense

    def id_features(self, d: str) -> list[FeatureSpec]:
        return [f for f in self.spec.domain(d).features if f.kind != "dense"]

    def other_space(self, d: str) -> SpaceMap:
        """The space of ``d``'s other_seq: the other domain's item space."""
        other = "src" if d == "tgt" else "tgt"
        return self.spaces[self.spec.domain(other).feature("item_id").space]

    def map_features(self, d: str, table: pa.Table, where: str) -> dict[str, pa.Array]:
        """Output column -> array of every feature of domain ``d`` (ids as int64 rows, ``seq`` and
        multi-valued features as list<int64>, dense as float32), in output order (``context`` / empty
        ``seq`` added when not configured), plus ``other_seq`` (empty lists when not configured)."""
        dom, n, out = self.spec.domain(d), table.num_rows, {}
        for f in dom.features:
            col = table.column(f.source_column)
            if f.kind == "dense":
                out[f.name] = self.dense[d][f.name].apply(col, where)
            elif f.kind == "id_list":
                out[f.name] = list_rows(col, self.spaces[f.space])
            else:
                out[f.name] = pa.array(self.spaces[f.space].map(col), pa.int64())
        if dom.feature("seq") is None:
            out["seq"] = empty_lists(n)
        if not any(f.token == CONTEXT for f in dom.features) and CONTEXT not in out:
            out[CONTEXT] = pa.array(np.zeros(n, np.int64), pa.int64())
        if dom.other_seq is not None:
            out["other_seq"] = list_rows(table.column(dom.other_seq.column), self.other_space(d))
        else:
            out["other_seq"] = empty_lists(n)
        return out

    def tables(self, d: str) -> dict[str, str]:
        """Space -> the table its features are looked up in within domain ``d``: named after the
        first id feature of the domain using the space (``item_id`` for the item space)."""
        out: dict[str, str] = {}
        for f in self.id_features(d):
            if f.kind == "id":
                out.setdefault(f.space, f.name)
        for f in self.id_features(d):  # a space only multi-valued features use: the first one's table
            out.setdefault(f.space, f.name)
        return out

    def poolings(self, d: str) -> dict[str, str]:
        """Space -> the pooling of its table within domain ``d``: that of the space's ``id_list``
        features (one per space, checked by the config), mean when it has none."""
        return {f.space: f.pooling for f in self.id_features(d) if f.kind == "id_list"}

    def schema_features(self, d: str) -> list[FeatureSpec]:
        """The configured features the model reads: ids, sequences, multi-valued features and
        binned dense features."""
        return [f for f in self.spec.domain(d).features if f.kind != "dense" or self.dense[d][f.name].boundaries
                is not None]

    def schema_json(self, d: str) -> dict[str, Any]:
        """The domain's ``DomainSchema.to_json()``: id features in their space's table, binned
        dense features in a table of their own, unbinned dense features (``bins: 0``) under
        ``dense`` (float columns the towers read after their token's embeddings)."""
        tables, pools = self.tables(d), self.poolings(d)

        def extra(f: FeatureSpec) -> dict[str, Any]:  # written only when not the default: earlier manifests stay
            out: dict[str, Any] = {"multi": True} if f.kind == "id_list" and f.name != "seq" else {}
            pool, dim = pools.get(f.space, "mean"), self.spec.space_dim(d, f.space)
            return {**out, **({"pooling": pool} if pool != "mean" else {}), **({"dim": dim} if dim else {})}

        feats = [{"name": f.name, "token": f.resolved_token, "cardinality": self.spaces[f.space].rows,
                  "table": tables[f.space], **extra(f)} if f.kind != "dense" else
                 {"name": f.name, "token": f.resolved_token, "cardinality": self.dense[d][f.name].rows, "table": f.name,
                  **({"dim": f.dim} if f.dim else {})}
                 for f in self.schema_features(d)]
        names = {f["name"] for f in feats}
        item = self.spec.domain(d).feature("item_id")
        if "seq" not in names:
            feats.append({"name": "seq", "token": "user", "cardinality": self.spaces[item.space].rows,
                          "table": tables[item.space], **extra(item)})
        if not any(f.token == CONTEXT for f in self.spec.domain(d).features):
            feats.append({"name": CONTEXT, "token": CONTEXT, "cardinality": 1, "table": CONTEXT})
        out: dict[str, Any] = {"domain": d, "features": feats}
        floats = [{"name": f.name, "token": f.resolved_token} for f in self.spec.domain(d).features
                  if f.kind == "dense" and self.dense[d][f.name].boundaries is None]
        if floats:
            out["dense"] = floats
        if d == "src" and self.spec.share is not None:  # absent without ``share``: earlier manifests stay
            out["shared"] = list(self.spec.share)
        return out

    # --------------------------------------------------------------------------------- files
    def to_json(self, vocab_files: dict[str, dict[str, Any]]) -> dict[str, Any]:
        spaces = {}
        for name, s in self.spaces.items():
            e: dict[str, Any] = {"kind": s.kind, "dtype": s.dtype, "rows": s.rows}
            if s.kind == "hash":
                e.update(buckets=s.buckets, salt=s.salt, algorithm=HASH_ALGORITHM)
            else:
                e["vocab"] = vocab_files[name]
            spaces[name] = e
        dense = {d: {n: {"column": st.column, "mean": st.mean, "std": st.std, "normalize": st.normalize,
                         "boundaries": None if st.boundaries is None else list(st.boundaries),
                         "rows": st.rows if st.boundaries is not None else None}
                     for n, st in per.items()} for d, per in self.dense.items()}
        config = to_dict(self.spec)
        if config["share"] is None:  # absent without ``share``: earlier features.json stay byte for byte
            del config["share"]
        del config["ren"]  # resolved: its pairs are the features named user_id / item_id / seq
        return {"format": FORMAT, "config": config, "spaces": spaces, "dense": dense}

    @staticmethod
    def load(root: str) -> "FeatureMap":
        """The mapping of a dataset written by `cctl-rec prepare` (vocabularies checked against
        their recorded sha256)."""
        from cctl_rec.data.manifest import join, sha256_file
        from cctl_rec.safe_io import decode_json, read_bounded

        path = join(root, FEATURES_JSON)
        d = decode_json(read_bounded(path, 64 << 20, "feature map"), path)
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path}: expected a feature map of format {FORMAT!r}")
        try:
            spec = from_dict(FeatureConfig, d["config"])
            spaces = {}
            for name, e in d["spaces"].items():
                vocab = None
                if e["kind"] == "vocab":
                    vpath = join(root, e["vocab"]["path"])
                    if sha256_file(vpath) != e["vocab"]["sha256"]:
                        raise ValueError(f"vocabulary {vpath} differs from the sha256 recorded in {path}")
                    vocab = normalise_ids(pq.read_table(vpath, columns=["raw_id"]).column("raw_id"), e["dtype"])
                spaces[name] = SpaceMap(name, e["kind"], e["dtype"], int(e["rows"]), int(e.get("buckets", 0)),
                                        int(e.get("salt", 0)), vocab)
            dense = {dm: {n: DenseStat(str(x["column"]), float(x["mean"]), float(x["std"]), str(x["normalize"]),
                                       None if x["boundaries"] is None else tuple(float(b) for b in x["boundaries"]))
                          for n, x in per.items()} for dm, per in d["dense"].items()}
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: malformed feature map (missing or mistyped {e})") from None
        return FeatureMap(spec, spaces, dense)


def dense_stat(column: str, total: float, total_sq: float, n: int, normalize: str,
               boundaries: Optional[tuple[float, ...]] = None) -> DenseStat:
    """Mean and (population) std from sums over the train split; std 0 (a constant) becomes 1."""
    mean = total / n if n else 0.0
    var = max(0.0, total_sq / n - mean * mean) if n else 0.0
    std = math.sqrt(var) if var > 0 else 1.0
    return DenseStat(column, mean, std, normalize, boundaries)


def quantile_boundaries(x: np.ndarray, bins: int) -> tuple[float, ...]:
    """The ``bins - 1`` inner edges at the quantiles j / bins of ``x``, ties merged (fewer bins
    when values repeat; none for an empty or constant ``x``)."""
    if x.size == 0 or bins <= 1:
        return ()
    q = np.quantile(x, np.arange(1, bins) / bins)
    return tuple(float(b) for b in np.unique(q) if b > x.min())


def dumps(d: dict[str, Any]) -> bytes:
    return (json.dumps(d, indent=1) + "\n").encode("utf-8")
