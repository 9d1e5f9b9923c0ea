"""EmbeddingBagCollection builders for one domain's tables (built on the meta device).

DistributedModelParallel materialises and shards them; sequences are MEAN pooled (the paper's
average pooling of the behaviour sequence), single-id features pool one id.
"""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

from cctl_rec.schema import DomainSchema


def table_configs(schema: DomainSchema, dim: int, exclude: tuple[str, ...] = ()) -> list[EmbeddingBagConfig]:
    """One EmbeddingBagConfig per table of ``schema`` (but ``exclude``'s features); the item table
    also serves ``seq``."""
    return [
        EmbeddingBagConfig(name=name, embedding_dim=dim, num_embeddings=rows, feature_names=keys,
                           pooling=PoolingType.MEAN)
        for name, rows, keys in schema.tables(exclude)
    ]


def build_ebc(schema: DomainSchema, dim: int, device: torch.device = torch.device("meta"),
              exclude: tuple[str, ...] = ()) -> EmbeddingBagCollection:
    """An EBC holding every table of ``schema``.

    Example::

        ebc = build_ebc(schemas["tgt"], dim=8)  # pooled output: B X (F * D)
    """
    return EmbeddingBagCollection(tables=table_configs(schema, dim, exclude), device=device)
