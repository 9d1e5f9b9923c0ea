"""Paired source/target streams -> :class:`CCTLBatch`, and evaluation batches."""

from __future__ import annotations

import logging
from typing import Iterator, Optional

import torch

from cctl_rec.config import DataConfig, TrainConfig
from cctl_rec.data.batch import CCTLBatch
from cctl_rec.data.manifest import check_shard, read_manifest, shard_paths
from cctl_rec.data.reader import (DomainRows, ParquetStream, bool_column, check_file_values, check_list_bounds,
                                  check_range, check_sequence_lengths, open_parquet, column_ids, dense_values, features,
                                  group_column, labels, make_kjt, position_features)
from cctl_rec.schema import HEAD_SEQUENCES, SEQ_COLUMN, DomainSchema, SeqPositions, check_dense_head, check_widths

logger = logging.getLogger(__name__)


class Dataset:
    """A dataset root (its ``manifest.json``): schemas and split files.

    Args:
        root: directory or URI written by ``cctl-rec datagen`` / ``cctl-rec convert``.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.manifest = read_manifest(root)
        self.schemas = {d: DomainSchema.from_json(self.manifest["schema"][d]) for d in ("src", "tgt")}
        src = self.paths("src/train") if self.has_split("src/train") else []
        self.has_harmful = False
        if src:
            with open_parquet(src[0]) as pf:
                self.has_harmful = "is_harmful" in pf.schema_arrow.names
        """The source rows carry the ground-truth ``is_harmful`` column (synthetic data, or
        ``convert --corrupt-frac``)."""

    def paths(self, split: str) -> list[str]:
        return shard_paths(self.root, self.manifest, split)

    def has_split(self, split: str) -> bool:
        return bool(self.manifest["splits"].get(split))

    def has_column(self, split: str, name: str) -> bool:
        """The split's files carry column ``name`` (every shard has the first one's columns)."""
        paths = self.paths(split) if self.has_split(split) else []
        if not paths:
            return False
        with open_parquet(paths[0]) as pf:
            return name in pf.schema_arrow.names

    def verify(self, splits: list[str], mode: str, rank: int = 0, world_size: int = 1) -> None:
        """Checks this rank's share (every ``world_size``-th file) of the splits' shards against
        the manifest (``mode``: none, size, sha256); raises naming the first that differs."""
        entries = [e for split in splits for e in self.manifest["splits"].get(split, [])]
        for e in entries[rank::world_size]:
            check_shard(self.root, e, mode)


def check_dataset(data: Dataset, cfg: TrainConfig, rank: int = 0, world_size: int = 1) -> None:
    """Everything about the data that can fail a training run, checked before it writes anything:
    the splits it needs; shards against the manifest (``data.verify``); every file's columns and
    types, the same across a split's shards; ids, nulls and labels from the footer statistics;
    dense float features only with a head that can read them;
    enough rows for ``world_size`` ranks; with ``data.long_seq=fail``, the sequence lengths; for
    MiNet, ``other_seq``'s ids against the target item table it is looked up in."""
    with_source = cfg.model.name == "cctl"
    need = ["tgt/train", "tgt/valid", "tgt/test"] + (["src/train"] if with_source else [])
    for split in need:
        if not data.has_split(split):
            raise ValueError(f"dataset {data.root} has no {split} split (it has {sorted(data.manifest['splits'])}); "
                             f"model.name={cfg.model.name} needs {', '.join(need)}")
    data.verify(need, cfg.data.verify, rank, world_size)
    check_dense_head(cfg.model.head, data.schemas, with_source)
    check_widths(cfg.model.head, data.schemas, cfg.model.embedding_dim, with_source)
    d = cfg.data
    streams = [ParquetStream(data.paths("tgt/train"), data.schemas["tgt"], d.batch_size, 0, world_size)]
    for split in ("tgt/valid", "tgt/test"):
        streams.append(ParquetStream(data.paths(split), data.schemas["tgt"], d.eval_batch_size, 0, world_size,
                                     drop_last=False))
    if with_source:
        streams.append(ParquetStream(data.paths("src/train"), data.schemas["src"],
                                     max(1, int(round(d.batch_size * d.src_ratio))), 0, world_size, cycle=True))
        if cfg.scn.reward_source == "heldout_batch" or (cfg.selector.mode == "influence" and
                                                        cfg.selector.influence_target == "heldout_batch"):
            ParquetStream(data.paths("tgt/valid"), data.schemas["tgt"], d.batch_size, 0, world_size, cycle=True)
    ts = data.schemas["tgt"]
    other_card = ts.seq_table_rows()
    reads_other = "other_seq" in HEAD_SEQUENCES.get(cfg.model.head, ())
    for st in streams:
        for path in st.paths:
            pf = open_parquet(path)
            try:
                check_file_values(path, pf, st.schema)
                if reads_other and st.schema.domain == "tgt":
                    check_list_bounds(path, pf, "other_seq", other_card,
                                      "other_seq (looked up in the target item table)")
                if d.long_seq == "fail":
                    check_sequence_lengths(path, pf, d.max_seq_len, tuple(st.schema.multi_features))
            finally:
                pf.close()


def split_source(src_feats: dict[str, tuple], schemas: dict[str, DomainSchema], shared: tuple[str, ...]
                 ) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Source features -> (those looked up in the source tables, keyed ``s_*`` in schema order;
    the shared attributes, re-keyed ``t_*`` for the mixed network's target tables)."""
    ts, ss = schemas["tgt"], schemas["src"]
    own = {k: src_feats[k] for k in ss.keys_without(shared)}
    return own, {ts.prefix + n: src_feats[ss.prefix + n] for n in shared}


def target_positions(tgt: DomainRows, ts: DomainSchema, tgt_feats: dict[str, tuple],
                     other: tuple, positions: SeqPositions) -> dict[str, tuple]:
    """The per-position keys of ``positions`` for the target rows (keys ``t_seq@j`` /
    ``t_other_seq@j``). ``other_seq`` holds source item ids; it is looked up in the TARGET item
    table (the converters give both item tables one id space; synthetic ids are global), so its
    ids must fit that table."""
    card = ts.seq_table_rows()
    out: dict[str, tuple] = {}
    for column in positions.columns:
        if column == SEQ_COLUMN:
            v, l = tgt_feats[ts.prefix + SEQ_COLUMN]
        else:
            v, l = other
            check_range(v, card, tgt.path, f"{column} (looked up in the target item table)")
        out.update(position_features(v, l, positions.column_keys(ts.prefix, column)))
    return out


def build_batch(tgt: DomainRows, src: Optional[DomainRows], schemas: dict[str, DomainSchema],
                cfg: DataConfig, shared: tuple[str, ...] = (), positions: Optional[SeqPositions] = None
                ) -> CCTLBatch:
    """Target rows (+ source rows) -> one :class:`CCTLBatch` (see its docstring for the layout).
    ``shared``: source attributes looked up in the target tables (``schema.shared_attributes``);
    ``positions``: per-position sequence keys appended to the target KJT (DIN / MiNet heads)."""
    ts, ss = schemas["tgt"], schemas["src"]
    tgt_feats = features(tgt, ts, cfg.max_seq_len, cfg.long_seq)
    seq_len = tgt_feats[ts.prefix + "seq"][1]
    other_v, other_l = column_ids(tgt, "other_seq", ss.feature("item_id").cardinality, cfg.max_seq_len,
                                  cfg.long_seq)
    user_in = bool_column(tgt, "user_in_other")
    tgt_keys, tgt_parts = ts.keys, tgt_feats
    if positions is not None:
        tgt_keys = ts.keys + positions.keys(ts.prefix)
        tgt_parts = {**tgt_feats, **target_positions(tgt, ts, tgt_feats, (other_v, other_l), positions)}
    batch = CCTLBatch(
        tgt=make_kjt(tgt_keys, [tgt_parts], [len(tgt)]),
        tgt_label=labels(tgt),
        user_in_other=user_in,
        item_in_other=bool_column(tgt, "item_in_other"),
        seq_mask=user_in & torch.from_numpy((seq_len > 0) & (other_l > 0)),
        tgt_group=group_column(tgt),
        tgt_dense=dense_values(tgt, ts),
    )
    if src is not None:
        ren = {ss.prefix + "user_id": tgt_feats[ts.prefix + "user_id"],
               ss.prefix + "item_id": tgt_feats[ts.prefix + "item_id"],
               ss.prefix + "seq": (other_v, other_l)}
        for key in ("user_id", "item_id"):  # the target's ids must also fit the source tables
            check_range(ren[ss.prefix + key][0], ss.feature(key).cardinality, tgt.path, key)
        own, as_tgt = split_source(features(src, ss, cfg.max_seq_len, cfg.long_seq), schemas, shared)
        batch.src = make_kjt(list(own), [own, ren], [len(src), len(tgt)])
        if shared:
            batch.mixed = make_kjt(ts.keys, [tgt_feats, as_tgt], [len(tgt), len(src)])
        batch.src_label = labels(src)
        batch.src_harmful = bool_column(src, "is_harmful")
        batch.src_dense = dense_values(src, ss)
    return batch


class TrainStream:
    """Target train batches paired with source train batches (the source stream cycles).

    Args:
        data: the dataset.
        cfg: data settings (batch size, source ratio, epochs, sequence length).
        rank, world_size: this rank's share.
        with_source: False for target-only models.
        shared: source attributes looked up in the target tables.
        positions: per-position sequence keys the model's head needs (``CCTL.positions``).
    """

    def __init__(self, data: Dataset, cfg: DataConfig, rank: int, world_size: int, with_source: bool = True,
                 shared: tuple[str, ...] = (), positions: Optional[SeqPositions] = None) -> None:
        self.data, self.cfg, self.rank, self.world_size = data, cfg, rank, world_size
        self.shared, self.positions = shared, positions
        self.tgt = ParquetStream(data.paths("tgt/train"), data.schemas["tgt"], cfg.batch_size, rank, world_size)
        self.src_batch = int(round(cfg.batch_size * cfg.src_ratio))
        self.src = None
        if with_source and self.src_batch > 0:
            self.src = ParquetStream(data.paths("src/train"), data.schemas["src"], self.src_batch, rank,
                                     world_size, cycle=True)

    def steps_per_epoch(self) -> int:
        return self.tgt.num_batches()

    def __iter__(self) -> Iterator[CCTLBatch]:
        return self.iterate(0)

    def iterate(self, start_step: int = 0) -> Iterator[CCTLBatch]:
        """Batches from step ``start_step`` on (a resumed run reads on where it stopped)."""
        per_epoch = self.steps_per_epoch()
        src_it = self.src.iterate(start_step * self.src_batch) if self.src is not None else None
        first_epoch, within = divmod(start_step, per_epoch)
        for epoch in range(first_epoch, self.cfg.epochs):
            skip = within * self.cfg.batch_size if epoch == first_epoch else 0
            for t in self.tgt.iterate(skip):
                s = next(src_it) if src_it is not None else None
                yield build_batch(t, s, self.data.schemas, self.cfg, self.shared, self.positions)


def eval_batches(data: Dataset, split: str, cfg: DataConfig, rank: int, world_size: int,
                 max_rows: int = 0, cycle: bool = False, positions: Optional[SeqPositions] = None
                 ) -> Iterator[CCTLBatch]:
    """Target-only batches of ``split`` (``tgt/valid`` or ``tgt/test``), last batch kept;
    ``positions``: as for :func:`build_batch`."""
    stream = ParquetStream(data.paths(split), data.schemas["tgt"], cfg.eval_batch_size, rank, world_size,
                           drop_last=False, cycle=cycle)
    seen = 0
    for rows in stream:
        if max_rows and seen >= max_rows // world_size:
            return
        seen += len(rows)
        yield build_batch(rows, None, data.schemas, cfg, positions=positions)


def heldout_batches(data: Dataset, cfg: DataConfig, rank: int, world_size: int, start_step: int = 0
                    ) -> Iterator[CCTLBatch]:
    """Endless target batches of ``tgt/valid`` at the training batch size (held-out reward)."""
    stream = ParquetStream(data.paths("tgt/valid"), data.schemas["tgt"], cfg.batch_size, rank, world_size,
                           cycle=True)
    for rows in stream.iterate(start_step * cfg.batch_size):
        yield build_batch(rows, None, data.schemas, cfg)
