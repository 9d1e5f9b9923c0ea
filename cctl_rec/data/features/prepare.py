"""``cctl-rec prepare``: a team's own two-domain Parquet logs + a feature config -> a cctl-rec dataset.

The output is exactly what ``cctl-rec datagen`` / ``convert`` write (``tgt/{train,valid,test}``,
``src/train`` Parquet shards and ``manifest.json`` last), so training, sharding plans, the mixed ->
pure sync, checkpoints and evaluation read it unchanged. The mapping is recorded beside it::

    OUT/features/features.json          the resolved mapping (transform.py's docstring)
    OUT/features/vocab/<space>.parquet  each vocabulary: raw_id, row, count

Passes over the raw files, each reading only the columns it needs, before anything is written:

1. footers: every file of every split has each configured column, of the declared type
   (``dtype``), one raw type per space;
2. the train splits (both domains): vocabulary counts, dense means / stds, the raw users and items
   of each domain (``user_in_other`` / ``item_in_other``), labels checked;
3. valid / test: labels and dense values checked;

then one pass maps and writes. Any bad input is one ValueError naming the file, the column and
the value, before the first byte of output (``cctl-rec prepare`` turns it into one line, exit 2).

Rows keep the raw files' order (sorted file names within a directory); nothing is shuffled or
sampled, so the same inputs give the same bytes.

Example::

    manifest = prepare("configs/features/amazon.yaml", data="raw/amazon", out="data/amazon-raw")
"""

from __future__ import annotations

import glob
import logging
import os
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from iopath.common.file_io import g_pathmgr

from cctl_rec.data.features.checks import PASSTHROUGH, check_footer, check_passthrough, labels
from cctl_rec.data.features.mapping import (VocabIndex, arrow_dtype, build_vocab, count_ids, merge_counts,
                                            normalise_ids)
from cctl_rec.data.features.spec import SPLITS, FeatureConfig, load_features
from cctl_rec.data.features.transform import (FEATURES_JSON, DenseStat, FeatureMap, SpaceMap, dense_stat, dumps,
                                              quantile_boundaries)
from cctl_rec.data.features.write import PRESET_PREFIX, ShardWriter, parquet_bytes, prepare_output, remove_stale
from cctl_rec.data.manifest import FORMAT, atomic_write_bytes, file_size, join, sha256_file, write_manifest
from cctl_rec.data.reader import open_parquet

logger = logging.getLogger(__name__)

BATCH_ROWS = 65_536
SPLIT_KEYS = [(d, s) for d in ("tgt", "src") for s in SPLITS[d]]


# ----------------------------------------------------------------------------------------- files
def resolve_files(data: str, pattern: str, what: str) -> list[str]:
    """The Parquet files of one split: ``pattern`` (relative to ``data`` unless absolute) is a
    file, a directory (its ``*.parquet``, sorted) or a glob."""
    full = pattern if os.path.isabs(pattern) else os.path.join(data, pattern)
    if os.path.isdir(full):
        out = sorted(glob.glob(os.path.join(full, "*.parquet")))
    elif any(c in full for c in "*?["):
        out = sorted(p for p in glob.glob(full) if os.path.isfile(p))
    else:
        out = [full] if os.path.exists(full) else []
    if not out:
        raise FileNotFoundError(f"{what}: no Parquet files at {full} (domains.<d>.files sets where each split is; "
                                f"default <domain>/<split> under --data)")
    return out


def _batches(pf: pq.ParquetFile, columns: list[str], path: str) -> Iterator[pa.Table]:
    try:
        for rb in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([rb])
    except (pa.ArrowInvalid, OSError) as e:
        from cctl_rec.safe_io import disk_error

        if disk_error(e) is not None:
            raise
        raise ValueError(f"data file {path} cannot be read ({str(e).splitlines()[0][:200]}); the file is corrupt "
                         f"or truncated") from None


# ----------------------------------------------------------------------------- pass 2: statistics
class TrainStats:
    """What the train splits say: id counts per vocabulary space, dense sums, raw users / items."""

    def __init__(self, spec: FeatureConfig) -> None:
        self.spec = spec
        self.counts: dict[str, list[pa.Table]] = {s.name: [] for s in spec.spaces if s.vocab is not None}
        self.sums: dict[tuple[str, str], list[float]] = {}
        self.entities: dict[tuple[str, str], list[pa.Array]] = {}
        self.values: dict[str, list[np.ndarray]] = {}

    def add(self, d: str, table: pa.Table, path: str, dtypes: dict[str, str]) -> None:
        dom = self.spec.domain(d)
        labels(self.spec, d, table, path)
        check_passthrough(table, path)
        cols = [(f.source_column, f.kind, f.space) for f in dom.features]
        if dom.other_seq is not None:
            other = "src" if d == "tgt" else "tgt"
            cols.append((dom.other_seq.column, "id_list", self.spec.domain(other).feature("item_id").space))
        for column, kind, space in cols:
            if kind == "dense":
                continue
            arr = table.column(column).combine_chunks()
            if kind == "id_list":
                arr = pc.list_flatten(arr)
            if space in self.counts:
                self.counts[space].append(count_ids(normalise_ids(arr, dtypes[space])))
                if len(self.counts[space]) > 16:
                    self.counts[space] = [merge_counts(self.counts[space])]
        for f in dom.features:
            if f.kind == "dense":
                x, null = DenseStat(f.source_column, 0.0, 1.0, "none").values(table.column(f.source_column),
                                                                              f"data file {path}")
                x = x[~null]
                s = self.sums.setdefault((d, f.name), [0.0, 0.0, 0])
                s[0] += float(x.sum())
                s[1] += float((x * x).sum())
                s[2] += int(x.size)
                if f.bins:  # both domains' values of a feature name pooled: one binning, a shareable table
                    self.values.setdefault(f.name, []).append(x)
        for role in ("user_id", "item_id"):
            f = dom.feature(role)
            arr = normalise_ids(table.column(f.source_column), dtypes[f.space])
            seen = self.entities.setdefault((d, role), [])
            seen.append(pc.unique(arr.drop_null()))
            if len(seen) > 16:
                seen[:] = [self.entity_set(d, role)]

    def entity_set(self, d: str, role: str) -> pa.Array:
        parts = self.entities.get((d, role), [])
        return pc.unique(pa.concat_arrays(parts)) if parts else pa.array([], pa.int64())


def reused_vocab(space: str, path: str, dtype: str, counts: pa.Table, min_coverage: float) -> pa.Table:
    """A vocabulary written by an earlier prepare, checked: its columns, its rows ``1..V`` in
    order, its id type, and that it covers ``min_coverage`` of the train ids' occurrences."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"space {space!r}: vocab.path {path} does not exist; expected a vocabulary written "
                                f"by cctl-rec prepare (OUT/features/vocab/{space}.parquet)")
    with open_parquet(path) as pf:
        t = pf.read()
    if not {"raw_id", "row"} <= set(t.column_names):
        raise ValueError(f"space {space!r}: vocabulary {path} has columns {t.column_names}; expected raw_id, row")
    got = arrow_dtype(t.schema.field("raw_id").type)
    if got != dtype:
        raise ValueError(f"space {space!r}: vocabulary {path} holds {got or t.schema.field('raw_id').type} ids but the "
                         f"data holds {dtype} ids; the vocabulary is from another dataset")
    rows = t.column("row").to_numpy()
    if not np.array_equal(rows, np.arange(1, t.num_rows + 1)):
        raise ValueError(f"space {space!r}: vocabulary {path} does not list rows 1..{t.num_rows} in order; expected a "
                         f"vocabulary written by cctl-rec prepare")
    ids = normalise_ids(t.column("raw_id"), dtype)
    if ids.null_count or len(pc.unique(ids)) != len(ids):
        raise ValueError(f"space {space!r}: vocabulary {path} has null or repeated ids")
    total = int(pc.sum(counts.column("count")).as_py() or 0)
    hit = int(pc.sum(pc.filter(counts.column("count"), pc.is_in(counts.column("raw_id"), value_set=ids))).as_py() or 0)
    cover = hit / total if total else 1.0
    if cover < min_coverage:
        raise ValueError(f"space {space!r}: vocabulary {path} holds {cover:.1%} of the train splits' id occurrences, "
                         f"less than vocab.min_coverage={min_coverage:g}; the vocabulary is from another dataset "
                         f"(build one: drop vocab.path)")
    return pa.table({"raw_id": ids, "row": t.column("row"),
                     "count": t.column("count") if "count" in t.column_names else pa.array(np.zeros(t.num_rows,
                                                                                                    np.int64))})


class SplitStats:
    """Rows, positives and the out-of-vocabulary share of every id feature of one written split."""

    def __init__(self) -> None:
        self.rows = self.pos = self.in_other = self.seq_len = 0
        self.oov: dict[str, list[int]] = {}

    def add(self, cols: dict[str, pa.Array], fmap: FeatureMap, d: str) -> None:
        n = len(cols["label"])
        self.rows += n
        self.pos += int(np.asarray(cols["label"]).sum())
        self.in_other += int(np.asarray(cols["user_in_other"].to_numpy(zero_copy_only=False)).sum())
        self.seq_len += int(pc.sum(pc.list_value_length(cols["seq"])).as_py() or 0)
        for f in fmap.schema_features(d):
            v = pc.list_flatten(cols[f.name]) if f.kind == "id_list" else cols[f.name]
            z = self.oov.setdefault(f.name, [0, 0])
            z[0] += int(pc.sum(pc.equal(v, 0)).as_py() or 0)
            z[1] += len(v)

    def to_json(self) -> dict[str, Any]:
        n = max(1, self.rows)
        return {"rows": self.rows, "positives": self.pos, "ctr": round(self.pos / n, 6),
                "seq_len_mean": round(self.seq_len / n, 4), "user_in_other_share": round(self.in_other / n, 6),
                "oov_share": {k: round(a / b, 6) if b else 0.0 for k, (a, b) in self.oov.items()}}


def resolve_spaces(spec: FeatureConfig, stats: TrainStats, dtypes: dict[str, str]
                   ) -> tuple[dict[str, SpaceMap], dict[str, pa.Table]]:
    """Each space's mapping (hash parameters, or the vocabulary built from / checked against the
    train counts) and the vocabularies to write."""
    spaces: dict[str, SpaceMap] = {}
    vocabs: dict[str, pa.Table] = {}
    for s in spec.spaces:
        if s.hash is not None:
            spaces[s.name] = SpaceMap(s.name, "hash", dtypes[s.name], s.hash.buckets + 1, s.hash.buckets, s.hash.salt)
            continue
        parts = stats.counts[s.name]
        empty = pa.array([], pa.int64() if dtypes[s.name] == "int64" else pa.large_string())
        counts = merge_counts(parts) if parts else pa.table({"raw_id": empty, "count": pa.array([], pa.int64())})
        if s.vocab.path:
            v = reused_vocab(s.name, s.vocab.path, dtypes[s.name], counts, s.vocab.min_coverage)
        else:
            v = build_vocab(counts, s.vocab.min_count, s.vocab.max_size)
            if v.num_rows == 0:
                raise ValueError(f"space {s.name!r}: no id occurs at least vocab.min_count={s.vocab.min_count} times in "
                                 f"the train splits; expected a smaller min_count")
        vocabs[s.name] = v
        spaces[s.name] = SpaceMap(s.name, "vocab", dtypes[s.name], v.num_rows + 1,
                                  vocab=normalise_ids(v.column("raw_id"), dtypes[s.name]))
    return spaces, vocabs


def dense_stats(spec: FeatureConfig, stats: TrainStats) -> dict[str, dict[str, DenseStat]]:
    """domain -> dense feature -> its train mean / std and, binned, its quantile edges (one set per
    feature name, from both domains' train values)."""
    dense: dict[str, dict[str, DenseStat]] = {"tgt": {}, "src": {}}
    bounds: dict[str, tuple[float, ...]] = {}
    for d in ("tgt", "src"):
        for f in spec.domain(d).features:
            if f.kind != "dense":
                continue
            total, sq, n = stats.sums.get((d, f.name), [0.0, 0.0, 0])
            edges = None
            if f.bins:
                if f.name not in bounds:
                    values = stats.values.get(f.name) or [np.zeros(0)]
                    bounds[f.name] = quantile_boundaries(np.concatenate(values), f.bins)
                edges = bounds[f.name]
            dense[d][f.name] = dense_stat(f.source_column, total, sq, n, f.normalize, edges)
    return dense


def check_heldout(fmap: FeatureMap, files: dict[tuple[str, str], list[str]]) -> None:
    """Reads the labels, dense values and ``user_group`` of the valid / test files (the train
    files were read for the statistics) and raises on the first bad value."""
    spec = fmap.spec
    for d, s in SPLIT_KEYS:
        if s == "train":
            continue
        dom = spec.domain(d)
        for p in files[(d, s)]:
            with open_parquet(p) as pf:
                cols = [dom.label.column] + [f.source_column for f in dom.features if f.kind == "dense"]
                cols += ["user_group"] if "user_group" in pf.schema_arrow.names else []
                for t in _batches(pf, list(dict.fromkeys(cols)), p):
                    labels(spec, d, t, p)
                    check_passthrough(t, p)
                    for f in dom.features:
                        if f.kind == "dense":
                            fmap.dense[d][f.name].apply(t.column(f.source_column), f"data file {p}")


# ------------------------------------------------------------------------------------- prepare
def prepare(features: str, data: str, out: str, shard_rows: int = 1_000_000) -> dict[str, Any]:
    """Maps the raw splits under ``data`` with the feature config ``features`` into a dataset at
    ``out``; returns its manifest (written last).

    Args:
        features: the feature config YAML (:mod:`cctl_rec.data.features.spec`).
        data: the raw data root the config's ``files`` are relative to.
        out: the dataset directory to write (an earlier prepare there is replaced).
        shard_rows: rows per output Parquet shard.
    """
    import cctl_rec

    if shard_rows < 1:
        raise ValueError(f"--shard-rows must be >= 1, got {shard_rows}")
    spec = load_features(features)
    files = {(d, s): resolve_files(data, spec.files(d, s), f"domains.{d}.files.{s}") for d, s in SPLIT_KEYS}
    seen: dict[str, tuple[str, str]] = {}
    for (d, split), paths in files.items():
        copied: dict[str, str] = {}
        for p in paths:
            with open_parquet(p) as pf:
                check_footer(spec, d, p, pf.schema_arrow, seen)
                have = ", ".join(c for c in PASSTHROUGH if c in pf.schema_arrow.names) or "none"
            if copied.setdefault("cols", have) != have:  # the shards of a split share one schema
                raise ValueError(f"data file {p} has the copied column(s) {have} but {paths[0]} has {copied['cols']}; "
                                 f"expected the same of ts, is_harmful, user_group in every file of {d}/{split}")
    for s in spec.spaces:
        if s.name not in seen:
            raise ValueError(f"space {s.name!r} is named by no feature; expected every space to be used (or remove it)")
    dtypes = {k: v[0] for k, v in seen.items()}

    stats = TrainStats(spec)
    for d in ("tgt", "src"):
        for p in files[(d, "train")]:
            with open_parquet(p) as pf:
                for t in _batches(pf, _read_columns(spec, d, pf.schema_arrow), p):
                    stats.add(d, t, p, dtypes)
    spaces, vocabs = resolve_spaces(spec, stats, dtypes)
    fmap = FeatureMap(spec, spaces, dense_stats(spec, stats))
    check_heldout(fmap, files)

    raw_files = [p for paths in files.values() for p in paths]
    prepare_output(out, raw_files)  # refuses an --out it must not write over
    logger.info("%d raw file(s) checked; mapping them into %s", len(raw_files), out)
    others = {(d, role): VocabIndex(stats.entity_set("src" if d == "tgt" else "tgt", role))
              for d in ("tgt", "src") for role in ("user_id", "item_id")}
    splits: dict[str, list[dict[str, Any]]] = {}
    split_stats: dict[str, Any] = {}
    for d, s in SPLIT_KEYS:
        key = f"{d}/{s}"
        w, st = ShardWriter(out, key, shard_rows), SplitStats()
        for p in files[(d, s)]:
            with open_parquet(p) as pf:
                names = pf.schema_arrow.names
                for t in _batches(pf, _read_columns(spec, d, pf.schema_arrow, with_passthrough=True), p):
                    cols = _output_columns(fmap, d, t, p, others, dtypes, names)
                    st.add(cols, fmap, d)
                    w.add(pa.table(cols))
        splits[key] = w.close()
        split_stats[key] = st.to_json()
    remove_stale(out, {e["path"] for v in splits.values() for e in v})

    vocab_files: dict[str, dict[str, Any]] = {}
    g_pathmgr.mkdirs(join(out, "features", "vocab"))
    for name, v in vocabs.items():
        rel = f"features/vocab/{name}.parquet"
        path = join(out, *rel.split("/"))
        atomic_write_bytes(path, parquet_bytes(v))
        vocab_files[name] = {"path": rel, "sha256": sha256_file(path), "size": v.num_rows}
    for name in g_pathmgr.ls(join(out, "features", "vocab")):  # an earlier prepare's spaces
        if name.endswith(".parquet") and name[:-len(".parquet")] not in vocabs:
            g_pathmgr.rm(join(out, "features", "vocab", name))
    fjson = fmap.to_json(vocab_files)
    fpath = join(out, *FEATURES_JSON.split("/"))
    atomic_write_bytes(fpath, dumps(fjson))
    cfg_path = os.path.abspath(features)
    manifest = {
        "format": FORMAT,
        "schema": {d: fmap.schema_json(d) for d in ("src", "tgt")},
        "splits": splits,
        "split_rule": "the raw data's own splits: " + "; ".join(f"{d}/{s} = {spec.files(d, s)}" for d, s in SPLIT_KEYS)
                      + " (rows in file order, files sorted by name)",
        "max_seq_len": spec.max_seq_len,
        "preset": PRESET_PREFIX + os.path.splitext(os.path.basename(features))[0],
        "params": {"features": {"path": cfg_path, "sha256": sha256_file(cfg_path)},
                   "data": os.path.abspath(data), "shard_rows": shard_rows,
                   "raw_files": {f"{d}/{s}": [{"path": os.path.abspath(p), "bytes": file_size(p)} for p in files[(d, s)]]
                                 for d, s in SPLIT_KEYS}},
        "seed": None,
        "version": cctl_rec.__version__,
        "stats": {"splits": split_stats,
                  "spaces": {n: {"kind": sp.kind, "dtype": sp.dtype, "rows": sp.rows} for n, sp in spaces.items()},
                  "dense": fjson["dense"]},
        "feature_map": {"path": FEATURES_JSON, "sha256": sha256_file(fpath)},
    }
    write_manifest(out, manifest)
    return manifest


def _read_columns(spec: FeatureConfig, d: str, arrow: pa.Schema, with_passthrough: bool = False) -> list[str]:
    dom = spec.domain(d)
    cols = [f.source_column for f in dom.features] + [dom.label.column]
    if dom.other_seq is not None:
        cols.append(dom.other_seq.column)
    if with_passthrough:
        cols += [c for c in PASSTHROUGH if c in arrow.names]
    elif "user_group" in arrow.names:
        cols.append("user_group")
    return list(dict.fromkeys(cols))


def _output_columns(fmap: FeatureMap, d: str, t: pa.Table, path: str, others: dict[tuple[str, str], VocabIndex],
                    dtypes: dict[str, str], names: list[str]) -> dict[str, pa.Array]:
    """The dataset columns of one raw batch of domain ``d``: features, label, other_seq, the REN
    masks (the raw user / item occurs in the other domain's train split) and passthrough columns."""
    spec = fmap.spec
    cols = fmap.map_features(d, t, f"data file {path}")
    cols["label"] = pa.array(labels(spec, d, t, path), pa.int8())
    for role, flag in (("user_id", "user_in_other"), ("item_id", "item_in_other")):
        f = spec.domain(d).feature(role)
        raw = normalise_ids(t.column(f.source_column), dtypes[f.space])
        cols[flag] = pa.array(others[(d, role)].rows(raw) > 0, pa.bool_())
    for c, (_, cast) in PASSTHROUGH.items():
        if c in names and not (c == "is_harmful" and d == "tgt") and not (c == "user_group" and d == "src"):
            cols[c] = pc.cast(t.column(c).combine_chunks(), cast)
    return cols
