"""CCTL's trainable networks: SCN (mixed + pure towers with their target tables), SAN and REN.

The IFN selector is kept outside this module: it is trained by REINFORCE (or the influence
signal), never by the tower loss, and is not wrapped in DistributedDataParallel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torchrec import KeyedJaggedTensor

from cctl_rec.config import ModelConfig
from cctl_rec.data.batch import CCTLBatch
from cctl_rec.modules.embedding import build_ebc
from cctl_rec.modules.san import SemanticAlign
from cctl_rec.modules.heads import DOMAIN_HEADS, DomainClassifier, build_head
from cctl_rec.schema import (HEAD_SEQUENCES, ID_FEATURES, TOKENS, DomainSchema, SeqPositions,
                             check_dense_head, check_widths, shared_attributes)


@dataclass
class CCTLOutput:
    """What one forward gives the trainer.

    Attributes:
        logit_tgt: B_t logits of the mixed tower on the target rows.
        logit_pure: B_t logits of the pure tower on the same rows.
        logit_src: B_s logits of the mixed tower on the SAN-aligned source rows (None: no source).
        x_tgt: B_t X W_t target representation through the mixed tables.
        x_src: B_s X W_t SAN-aligned source representation (the selector's input, not detached).
        ren_id_s, ren_id_t: 2B_t X D id embeddings (users then items) in source / target tables.
        ren_seq_s, ren_seq_t: B_t X D mean-pooled other-domain / own-domain sequences.
        logit_domain: (B_t + B_s) domain logits (source = 1) of the DANN classifier, or None.
    """

    logit_tgt: Optional[torch.Tensor]
    logit_pure: torch.Tensor
    logit_src: Optional[torch.Tensor] = None
    x_tgt: Optional[torch.Tensor] = None
    x_src: Optional[torch.Tensor] = None
    ren_id_s: Optional[torch.Tensor] = None
    ren_id_t: Optional[torch.Tensor] = None
    ren_seq_s: Optional[torch.Tensor] = None
    ren_seq_t: Optional[torch.Tensor] = None
    logit_domain: Optional[torch.Tensor] = None


def _tokens(pooled: dict[str, torch.Tensor], schema: DomainSchema, rows: slice,
            dense: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """token -> B X (n_token_features * D + n_token_dense), features in schema order, then the
    token's dense floats (columns of ``dense``, B X F_dense, already cut to ``rows``)."""
    out = {}
    for t in TOKENS:
        parts = [pooled[k][rows] for k in schema.token_features(t)]
        idx = schema.token_dense(t)
        if idx:
            parts.append(_dense_cols(dense, idx, schema))
        out[t] = torch.cat(parts, dim=1)
    return out


def _dense_cols(dense: Optional[torch.Tensor], idx: list[int], schema: DomainSchema) -> torch.Tensor:
    if dense is None:
        raise ValueError(f"the {schema.domain} schema has dense features {schema.dense_columns} but the batch "
                         f"carries none; expected batches built from this dataset")
    return dense[:, idx[0]:idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else dense[:, idx]


class CCTL(nn.Module):
    """SCN + SAN + REN over TorchRec EmbeddingBagCollections.

    - ``mixed_tgt`` / ``pure_tgt``: the target ID tables of the mixed and the pure network (same
      tables, same sharding plan, so the k-step sync is a shard-local copy);
    - ``src``: the source ID tables (REN keeps them separate from the target's);
    - ``san``: one MLP per token mapping source tokens to the target token widths (Eq. 7);
    - ``mixed_tower`` / ``pure_tower``: identical MLPs (Eq. 3 / Eq. 4).

    With ``with_source=False`` only the pure network exists: the target-only DNN baseline.
    Only the pure network (``pure_tgt`` + ``pure_tower``) is served.

    A head that attends over behaviour sequences (DIN, MiNet) gets them position by position:
    ``positions`` names the per-position KJT keys the target batches must carry (the loader
    builds them), looked up in the target item table beside the pooled fields.

    Args:
        schemas: {"src": ..., "tgt": ...}.
        cfg: model settings.
        with_source: build the mixed network, SAN and source tables.
        device: where the tables are built (meta: DistributedModelParallel materialises them).
        seq_len: L, positions per attended sequence (``data.max_seq_len``; only DIN / MiNet use it).

    Example::

        model = CCTL(data.schemas, ModelConfig(), device=torch.device("cpu"))
        out = model(batch)  # out.logit_pure: B_t
    """

    def __init__(self, schemas: dict[str, DomainSchema], cfg: ModelConfig, with_source: bool = True,
                 device: torch.device = torch.device("meta"), seq_len: int = 20) -> None:
        super().__init__()
        self.schemas, self.cfg, self.with_source = schemas, cfg, with_source
        ts, ss, d = schemas["tgt"], schemas["src"], cfg.embedding_dim
        check_dense_head(cfg.head, schemas, with_source)
        check_widths(cfg.head, schemas, d, with_source)
        self.tgt_dims = {t: ts.token_width(t, d) for t in TOKENS}
        width = sum(self.tgt_dims.values())
        self.positions: Optional[SeqPositions] = (SeqPositions(HEAD_SEQUENCES[cfg.head], seq_len)
                                                  if cfg.head in HEAD_SEQUENCES else None)
        fields = {name: i for i, name in enumerate(ts.field_names())}
        self.pure_tgt = build_ebc(ts, d, device, positions=self.positions)
        self.pure_tower = build_head(cfg.head, width, d, cfg.tower, fields=fields)
        shared = shared_attributes(ss, ts) if cfg.share_attributes else ()
        if cfg.share_ids:
            shared = tuple(f.name for f in ss.features if f.name in ID_FEATURES) + shared
        self.shared: tuple[str, ...] = shared if with_source else ()
        if with_source:
            self.mixed_tgt = build_ebc(ts, d, device, positions=self.positions)
            self.src = build_ebc(ss, d, device, exclude=self.shared)
            # False when every source feature is looked up in the target tables (share_ids on
            # data whose two schemas are the same, e.g. converted data): ``src`` has no table
            # and is never called (an EBC without tables cannot pool)
            self.src_has_tables = bool(ss.keys_without(self.shared))
            src_dims = {t: ss.token_width(t, d) for t in TOKENS}
            same = frozenset(t for t in TOKENS if ss.token_names(t) == ts.token_names(t) and  # same features,
                             src_dims[t] == self.tgt_dims[t])  # each as wide in both domains (per-feature dim)
            self.san = SemanticAlign(src_dims, self.tgt_dims, cfg.san_hidden, identity=same)
            self.mixed_tower = build_head(cfg.head, width, d, cfg.tower, ("tgt", "src"), fields=fields)
            if cfg.dann_weight > 0:
                self.domain_clf = DomainClassifier(width)

    @property
    def width(self) -> int:
        return sum(self.tgt_dims.values())

    def target_repr(self, kjt: KeyedJaggedTensor, network: str = "pure",
                    dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """v^t of Eq. 2 through the ``network``'s target tables: B_t X W_t."""
        return self.target_inputs(kjt, network, dense)[0]

    def target_inputs(self, kjt: KeyedJaggedTensor, network: str = "pure", dense: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(v^t: B_t X W_t, the head's sequence inputs): per column of ``positions``, its
        B_t X L X D position embeddings and B_t X L bool mask (a position holds an item); () for
        heads without sequences. ``dense``: B_t X F_dense target dense features (when the schema
        has any)."""
        ebc = self.pure_tgt if network == "pure" else self.mixed_tgt
        pooled = ebc(kjt).to_dict()
        tok = _tokens(pooled, self.schemas["tgt"], slice(None), dense)
        return torch.cat([tok[t] for t in TOKENS], dim=1), self._sequences(pooled, kjt)

    def _sequences(self, pooled: dict[str, torch.Tensor], kjt: KeyedJaggedTensor) -> tuple[torch.Tensor, ...]:
        if self.positions is None:
            return ()
        p, names = self.schemas["tgt"].prefix, kjt.keys()
        row = {k: i for i, k in enumerate(names)}
        lengths = kjt.lengths().view(len(names), -1)                          # F_kjt X B (key-major)
        out: list[torch.Tensor] = []
        for column in self.positions.columns:
            keys = self.positions.column_keys(p, column)
            out.append(torch.stack([pooled[k] for k in keys], dim=1))                        # B X L X D
            out.append(lengths[[row[k] for k in keys]].t() > 0)                             # B X L
        return tuple(out)

    def predict(self, kjt: KeyedJaggedTensor, network: str = "pure", dense: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        """Logits of the ``network`` ("pure" or "mixed") on target rows: B_t (``dense``: their
        B_t X F_dense dense features, ``CCTLBatch.tgt_dense``)."""
        tower = self.pure_tower if network == "pure" else self.mixed_tower
        x, seqs = self.target_inputs(kjt, network, dense)
        return tower(x, *seqs)

    def source_repr(self, src_pooled: dict[str, torch.Tensor], n_src: int,
                    shared_pooled: Optional[dict[str, torch.Tensor]] = None, shared_rows: slice = slice(None),
                    dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SAN-aligned source representation: B_s X W_t. Own-table features come from the first
        ``n_src`` rows of ``src_pooled``; shared attributes from ``shared_pooled[shared_rows]``
        (the mixed target tables' output, keys ``t_*``); the source's dense floats (``dense``,
        B_s X F_dense_s) join their token's input to SAN, which maps each token (embeddings and
        floats) to the target token's width (its embeddings and floats)."""
        ss, tp = self.schemas["src"], self.schemas["tgt"].prefix
        tokens = {}
        for t in TOKENS:
            parts = []
            for key in ss.token_features(t):
                name = key[len(ss.prefix):]
                if name in self.shared:
                    assert shared_pooled is not None
                    parts.append(shared_pooled[tp + name][shared_rows])
                else:
                    parts.append(src_pooled[key][:n_src])
            idx = ss.token_dense(t)
            if idx:
                parts.append(_dense_cols(dense, idx, ss))
            tokens[t] = torch.cat(parts, dim=1)
        aligned = self.san(tokens)
        return torch.cat([aligned[t] for t in TOKENS], dim=1)

    def score_source(self, src_kjt: KeyedJaggedTensor, shared_kjt: Optional[KeyedJaggedTensor], n_src: int,
                     dense: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SAN-aligned representation of source-only KJTs (own tables; shared attributes in the
        target layout; ``dense``: the rows' B_s X F_dense_s floats), for scoring source rows
        outside training: B_s X W_t."""
        shared = self.mixed_tgt(shared_kjt).to_dict() if shared_kjt is not None else None
        return self.source_repr(self._src_pooled(src_kjt), n_src, shared, dense=dense)

    def source_logits(self, x_src: torch.Tensor) -> torch.Tensor:
        """The mixed network's B_s logits on SAN-aligned source rows (B_s X W_t)."""
        return self.mixed_tower(x_src, "src") if self.cfg.head in DOMAIN_HEADS else self.mixed_tower(x_src)

    def _src_pooled(self, kjt: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        return self.src(kjt).to_dict() if self.src_has_tables else {}

    def forward(self, batch: CCTLBatch) -> CCTLOutput:
        ts, ss = self.schemas["tgt"], self.schemas["src"]
        x_pure, seqs = self.target_inputs(batch.tgt, "pure", batch.tgt_dense)
        logit_pure = self.pure_tower(x_pure, *seqs)
        if not self.with_source:
            return CCTLOutput(logit_tgt=None, logit_pure=logit_pure)
        n_t = batch.tgt_label.shape[0]
        mixed = self.mixed_tgt(batch.mixed if batch.mixed is not None else batch.tgt).to_dict()  # B_t (+ B_s) rows
        tok = _tokens(mixed, ts, slice(0, n_t), batch.tgt_dense)
        x_tgt = torch.cat([tok[t] for t in TOKENS], dim=1)                  # B_t X W_t
        if batch.src is None:  # no source rows this step (data.src_ratio=0)
            return CCTLOutput(logit_tgt=self.mixed_tower(x_tgt), logit_pure=logit_pure, x_tgt=x_tgt)
        n_s = batch.num_src
        src = self._src_pooled(batch.src)                                     # (B_s + B_t) rows
        x_src = self.source_repr(src, n_s, mixed, slice(n_t, n_t + n_s), batch.src_dense)  # B_s X W_t
        x_all = torch.cat([x_tgt, x_src], dim=0)
        if self.cfg.head in DOMAIN_HEADS:  # STAR / CoNet: each domain through its own factors / column
            logits = torch.cat([self.mixed_tower(x_tgt, "tgt"), self.mixed_tower(x_src, "src")])
        else:
            logits = self.mixed_tower(x_all)                                  # one pass, B_t + B_s
        dom = self.domain_clf(x_all) if hasattr(self, "domain_clf") else None  # DANN baseline only
        ren = slice(n_s, n_s + n_t)
        p = ss.prefix
        if self.cfg.share_ids:  # one ID table per entity: nothing for REN to compare
            return CCTLOutput(logit_tgt=logits[:n_t], logit_pure=logit_pure, logit_src=logits[n_t:],
                              x_tgt=x_tgt, x_src=x_src, logit_domain=dom)
        return CCTLOutput(
            logit_tgt=logits[:n_t], logit_pure=logit_pure, logit_src=logits[n_t:], x_tgt=x_tgt, x_src=x_src,
            ren_id_s=torch.cat([src[p + "user_id"][ren], src[p + "item_id"][ren]], dim=0),
            ren_id_t=torch.cat([mixed[ts.prefix + "user_id"][:n_t], mixed[ts.prefix + "item_id"][:n_t]], dim=0),
            ren_seq_s=src[p + "seq"][ren], ren_seq_t=mixed[ts.prefix + "seq"][:n_t], logit_domain=dom,
        )
