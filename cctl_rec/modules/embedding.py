"""EmbeddingBagCollection builders for one domain's tables (built on the meta device).

DistributedModelParallel materialises and shards them; sequences are MEAN pooled (the paper's
average pooling of the behaviour sequence) unless the schema gives their table ``pooling: sum``,
multi-valued features (``Feature.multi``) are pooled as their table says, single-id features pool
one id. Per-position
sequence keys (:class:`~cctl_rec.schema.SeqPositions`, for DIN / MiNet) are extra features of the
item table: a bag of at most one id, whose MEAN (or SUM) is that id's embedding (an empty bag: zeros). They
add no table, so sharding plans, the mixed -> pure sync and checkpoints are unchanged.
"""

from __future__ import annotations

from typing import Optional

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from cctl_rec.schema import SEQ_COLUMN, DomainSchema, SeqPositions

POOLING = {"mean": PoolingType.MEAN, "sum": PoolingType.SUM}
"""``Feature.pooling`` -> TorchRec's pooling of the table."""


def table_configs(schema: DomainSchema, dim: int, exclude: tuple[str, ...] = (),
                  positions: Optional[SeqPositions] = None) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table of ``schema`` (but ``exclude``'s features), ``dim`` wide
    unless its features say otherwise (``Feature.dim``); the item table also serves ``seq`` and,
    with ``positions``, every position key."""
    extra = {}
    if positions is not None:
        extra[schema.prefix + schema.feature(SEQ_COLUMN).table] = positions.keys(schema.prefix)
    pooling, dims = schema.table_pooling(), schema.table_dims(dim)
    return [
        EmbeddingBagConfig(name=name, embedding_dim=dims[name], num_embeddings=rows,
                           feature_names=keys + extra.get(name, []), pooling=POOLING[pooling[name]])
        for name, rows, keys in schema.tables(exclude)
    ]


def build_ebc(schema: DomainSchema, dim: int, device: torch.device = torch.device("meta"),
              exclude: tuple[str, ...] = (), positions: Optional[SeqPositions] = None) -> EmbeddingBagCollection:
    """An EBC holding every table of ``schema``.

    Example::

        ebc = build_ebc(schemas["tgt"], dim=8)  # pooled output: B X (F * D)
    """
    return EmbeddingBagCollection(tables=table_configs(schema, dim, exclude, positions), device=device)
