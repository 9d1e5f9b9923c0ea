"""The two domains' features, grouped into the paper's semantic tokens (user / item / context).

Every dataset (synthetic or converted) carries its schema in ``manifest.json``; this module is
the one place that turns it into embedding tables and KeyedJaggedTensor keys.

Parquet columns of a domain's rows:

- one integer column per categorical feature (``user_id``, ``item_id``, ``gender`` ...);
- ``seq``: list<int64>, the user's recent items **in this domain** (newest last);
- a multi-valued feature (``Feature.multi``, e.g. a user's tags): list<int64>, pooled in its table's
  bag (MEAN or SUM, ``Feature.pooling``; a list longer than ``data.max_seq_len`` keeps its last
  ``max_seq_len`` ids, like ``seq``);
- ``other_seq``: list<int64>, the user's recent items in the other domain (empty when absent);
- ``user_in_other`` / ``item_in_other``: bool, the entity exists in the other domain (REN mask);
- ``label``: int8 in {0, 1}; ``ts``: int64 time-like order key;
- ``is_harmful`` (source only, optional): ground truth for analysis, never a model feature.

KJT keys and table names are prefixed by the domain: ``t_`` target, ``s_`` source. The sequence
features share their domain's item table (``t_seq`` -> table ``t_item_id``) and are pooled as that table
is (MEAN unless a prepared dataset says ``pooling: sum``).
Heads that attend over a sequence (DIN, MiNet) also get one key per position, ``t_seq@0`` ...
``t_seq@{L-1}`` (:class:`SeqPositions`), in the same item table: a bag of the j-th kept item
(oldest first) or an empty bag past the row's length.

Dense (float) features (``cctl-rec prepare``'s ``kind: dense, bins: 0``) are float32 columns, already
standardised with the train split's mean / std; they belong to a token too and enter the towers as
floats concatenated after that token's pooled embeddings (:meth:`DomainSchema.token_width`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

TOKENS = ("user", "item", "context")
DOMAINS = ("src", "tgt")
PREFIX = {"src": "s_", "tgt": "t_"}
# Non-feature columns every domain file has; ``is_harmful`` may follow in the source.
META_COLUMNS = ("label", "ts", "other_seq", "user_in_other", "item_in_other")
SEQ_COLUMN = "seq"
POOLINGS = ("mean", "sum")

Token = Literal["user", "item", "context"]


@dataclass(frozen=True)
class Feature:
    """One categorical feature.

    Args:
        name: Parquet column name (``seq`` for the behaviour sequence).
        token: the semantic token it belongs to: user, item or context.
        cardinality: ids are in [0, cardinality).
        table: the embedding table it is looked up in (``item_id`` for ``seq``).
        multi: a list of ids per row (a multi-valued feature such as a user's tags: a
            ``list<int>`` column, pooled in its table's bag); ``seq`` is a list without it.
        pooling: ``mean`` or ``sum``, how its table pools a bag; every feature of a table has the
            table's (TorchRec pools per table). A bag of one id is that id's embedding either way.
        dim: its table's embedding width; 0 = ``model.embedding_dim`` (every feature of a table
            has the table's). A token's width is the sum of its features' widths.
    """

    name: str
    token: str
    cardinality: int
    table: str
    multi: bool = False
    pooling: str = "mean"
    dim: int = 0

    def __post_init__(self) -> None:
        if self.token not in TOKENS:
            raise ValueError(f"feature {self.name}: token must be one of {TOKENS}, got {self.token!r}")
        if self.cardinality <= 0:
            raise ValueError(f"feature {self.name}: cardinality must be > 0, got {self.cardinality}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"feature {self.name}: pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.dim < 0:
            raise ValueError(f"feature {self.name}: dim must be >= 0 (0: model.embedding_dim), got {self.dim}")

    def width(self, dim: int) -> int:
        """Its embedding width when the model's default is ``dim``."""
        return self.dim or dim

    @property
    def is_seq(self) -> bool:
        return self.name == SEQ_COLUMN

    @property
    def is_list(self) -> bool:
        """A list column (``seq`` or a multi-valued feature), not one id per row."""
        return self.is_seq or self.multi


@dataclass(frozen=True)
class DenseFeature:
    """One dense (float) feature: a float32 column read as is (standardised when written).

    Args:
        name: Parquet column name.
        token: the semantic token it belongs to: user, item or context.
    """

    name: str
    token: str

    def __post_init__(self) -> None:
        if self.token not in TOKENS:
            raise ValueError(f"dense feature {self.name}: token must be one of {TOKENS}, got {self.token!r}")


@dataclass(frozen=True)
class DomainSchema:
    """The features of one domain, in token order.

    Args:
        domain: ``src`` or ``tgt``.
        features: every categorical feature, ``seq`` included.
        dense: the dense float features (B X F_dense floats, this order), none for most data.
        shared: (source schema) the attributes the mixed network looks up in the target tables, as a
            feature config's ``share`` declares them; None: the rule of :func:`shared_attributes`.
    """

    domain: str
    features: tuple[Feature, ...]
    dense: tuple[DenseFeature, ...] = ()
    shared: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        names = [f.name for f in self.features] + [f.name for f in self.dense]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.domain} schema repeats a feature: {names}")
        for need in ("user_id", "item_id", SEQ_COLUMN):
            if need not in names:
                raise ValueError(f"{self.domain} schema lacks the required feature '{need}'")
        tables = {f.table: f.cardinality for f in self.features if not f.is_seq}
        seq = self.feature(SEQ_COLUMN)
        if seq.table not in tables:
            raise ValueError(f"{self.domain}: seq must share an id table, got table {seq.table!r}")
        pools: dict[str, Feature] = {}
        for f in self.features:
            first = pools.setdefault(f.table, f)
            if first.pooling != f.pooling:
                raise ValueError(f"{self.domain}: features {first.name!r} (pooling {first.pooling}) and {f.name!r} "
                                 f"(pooling {f.pooling}) share table {f.table!r}; expected one pooling per table "
                                 f"(TorchRec's EmbeddingBagConfig pools per table)")
            if first.dim != f.dim:
                raise ValueError(f"{self.domain}: features {first.name!r} (dim {first.dim}) and {f.name!r} (dim "
                                 f"{f.dim}) share table {f.table!r}; expected one dim per table")

    @property
    def prefix(self) -> str:
        return PREFIX[self.domain]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"{self.domain} schema has no feature {name!r}")

    def seq_table_rows(self) -> int:
        """Rows of the item table ``seq`` is looked up in (also every per-position key and
        MiNet's ``other_seq``)."""
        return self.feature(self.feature(SEQ_COLUMN).table).cardinality

    @property
    def columns(self) -> list[str]:
        """Feature columns in KJT key order."""
        return [f.name for f in self.features]

    @property
    def keys(self) -> list[str]:
        """KJT keys (domain-prefixed), same order as :attr:`columns`."""
        return [self.prefix + f.name for f in self.features]

    def tables(self, exclude: tuple[str, ...] = ()) -> list[tuple[str, int, list[str]]]:
        """(table name, rows, KJT feature keys) per table, in first-use order; features named in
        ``exclude`` (looked up in another domain's tables) are left out."""
        out: dict[str, tuple[int, list[str]]] = {}
        for f in self.features:
            if f.name in exclude:
                continue
            card = self.seq_table_rows() if f.is_seq else f.cardinality
            rows, keys = out.setdefault(self.prefix + f.table, (card, []))
            keys.append(self.prefix + f.name)
        return [(name, rows, keys) for name, (rows, keys) in out.items()]

    def table_pooling(self) -> dict[str, str]:
        """Table name (domain-prefixed, as :meth:`tables` names it) -> its pooling, mean or sum."""
        return {self.prefix + f.table: f.pooling for f in self.features}

    def table_dims(self, dim: int) -> dict[str, int]:
        """Table name (domain-prefixed) -> its embedding width when the model's default is ``dim``."""
        return {self.prefix + f.table: f.width(dim) for f in self.features}

    @property
    def list_columns(self) -> list[str]:
        """Feature columns that hold a list of ids per row: ``seq`` and the multi-valued features."""
        return [f.name for f in self.features if f.is_list]

    @property
    def multi_features(self) -> list[str]:
        """The multi-valued features (list columns other than ``seq``), in schema order."""
        return [f.name for f in self.features if f.is_list and not f.is_seq]

    def keys_without(self, exclude: tuple[str, ...]) -> list[str]:
        """KJT keys of the features not in ``exclude``."""
        return [self.prefix + f.name for f in self.features if f.name not in exclude]

    def token_features(self, token: str) -> list[str]:
        """KJT keys of a token, in order; ``seq`` belongs to the user token."""
        return [self.prefix + f.name for f in self.features if f.token == token]

    def token_dense(self, token: str) -> list[int]:
        """Indices (into :attr:`dense`) of the token's dense features, in order."""
        return [i for i, f in enumerate(self.dense) if f.token == token]

    def token_width(self, token: str, dim: int) -> int:
        """The token's width in the tower input: its pooled embeddings (each its feature's width,
        ``dim`` unless the feature says otherwise), then its dense floats."""
        return (sum(f.width(dim) for f in self.features if f.token == token) +
                len(self.token_dense(token)))

    @property
    def dense_columns(self) -> list[str]:
        """Dense feature columns, in :attr:`dense` order (the batch's B X F_dense layout)."""
        return [f.name for f in self.dense]

    def token_names(self, token: str) -> list[str]:
        """Feature names of a token as they enter the tower: its categorical features, then its
        dense ones (SAN passes a token through when both domains have the same names)."""
        return ([k[len(self.prefix):] for k in self.token_features(token)] +
                [self.dense[i].name for i in self.token_dense(token)])

    def field_names(self) -> list[str]:
        """Feature names in the order their pooled embeddings are concatenated into the tower
        input (user, item, context token; schema order within a token)."""
        return [k[len(self.prefix):] for t in TOKENS for k in self.token_features(t)]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"domain": self.domain,
                               "features": [{"name": f.name, "token": f.token, "cardinality": f.cardinality,
                                             "table": f.table, **({"multi": True} if f.multi else {}),
                                             **({"pooling": f.pooling} if f.pooling != "mean" else {}),
                                             **({"dim": f.dim} if f.dim else {})}
                                            for f in self.features]}
        if self.dense:  # absent without dense features: earlier manifests and fingerprints stay as they were
            out["dense"] = [{"name": f.name, "token": f.token} for f in self.dense]
        if self.shared is not None:  # a feature config's ``share`` (source schema); absent: the rule
            out["shared"] = list(self.shared)
        return out

    @staticmethod
    def from_json(d: dict[str, Any]) -> "DomainSchema":
        try:
            feats = tuple(Feature(str(x["name"]), str(x["token"]), int(x["cardinality"]), str(x["table"]),
                                  bool(x.get("multi", False)), str(x.get("pooling", "mean")), int(x.get("dim", 0)))
                          for x in d["features"])
            dense = tuple(DenseFeature(str(x["name"]), str(x["token"])) for x in d.get("dense", ()))
            shared = tuple(str(x) for x in d["shared"]) if d.get("shared") is not None else None
            return DomainSchema(str(d["domain"]), feats, dense, shared)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed domain schema in manifest: missing {e}") from None


ID_FEATURES = ("user_id", "item_id", SEQ_COLUMN)


HEAD_SEQUENCES = {"din": (SEQ_COLUMN,), "minet": (SEQ_COLUMN, "other_seq")}
"""``model.head`` -> the list columns of the target rows it reads position by position."""


@dataclass(frozen=True)
class SeqPositions:
    """Per-position lookups of list columns of the target rows, for heads that attend over a
    behaviour sequence: position ``j`` of ``column`` is the KJT key ``{prefix}{column}@{j}``, a bag of
    the row's ``j``-th item (oldest kept item first, the newest ``length`` kept) or an empty bag
    (pooled: zeros) past its end. Every position is looked up in the domain's item table, the one
    ``seq`` uses, so position embeddings and the candidate ``item_id`` are the same vectors.

    Args:
        columns: list columns to expand: ``seq`` and/or ``other_seq``.
        length: L, positions per column (``data.max_seq_len``).

    Example::

        SeqPositions(("seq",), 3).keys("t_")  # ['t_seq@0', 't_seq@1', 't_seq@2']
    """

    columns: tuple[str, ...]
    length: int

    def __post_init__(self) -> None:
        bad = [c for c in self.columns if c not in (SEQ_COLUMN, "other_seq")]
        if bad or not self.columns:
            raise ValueError(f"sequence positions expand seq and/or other_seq, got {list(self.columns)}")
        if self.length <= 0:
            raise ValueError(f"sequence positions need a length > 0, got {self.length}")

    def column_keys(self, prefix: str, column: str) -> list[str]:
        return [f"{prefix}{column}@{j}" for j in range(self.length)]

    def keys(self, prefix: str) -> list[str]:
        """Every position key, column by column."""
        return [k for c in self.columns for k in self.column_keys(prefix, c)]


FIELD_HEADS = ("deepfm", "afm", "din", "minet")
"""Heads that read the tower input as F fields of width D: no room for dense floats."""


def check_dense_head(head: str, schemas: dict[str, "DomainSchema"], with_source: bool = True) -> None:
    """Raises ValueError when ``head`` reads the tower input as fields (:data:`FIELD_HEADS`) and the
    schemas have dense float features (which are not D wide)."""
    dense = schemas["tgt"].dense_columns + (schemas["src"].dense_columns if with_source else [])
    if head in FIELD_HEADS and dense:
        raise ValueError(f"model.head={head} reads the tower input as fields of width model.embedding_dim and "
                         f"cannot take the dataset's dense features {dense}; expected model.head mlp, lr, star or "
                         f"conet (or prepare them with bins > 0)")


def check_widths(head: str, schemas: dict[str, "DomainSchema"], dim: int, with_source: bool = True) -> None:
    """Raises ValueError when per-feature widths (``Feature.dim``) break what the model assumes:
    a field head (:data:`FIELD_HEADS`) views the tower input as F fields of width ``dim``; REN
    (``with_source``) compares ``user_id``, ``item_id`` and the pooled sequences (item table) of the
    two domains by cosine and stacks users and items, so those four tables need one width."""
    doms = ("tgt", "src") if with_source else ("tgt",)
    odd = [f"{d}.{f.name}={f.width(dim)}" for d in doms for f in schemas[d].features if f.width(dim) != dim]
    if head in FIELD_HEADS and odd:
        raise ValueError(f"model.head={head} reads the tower input as fields of width model.embedding_dim={dim} but "
                         f"the dataset gives features other widths ({', '.join(odd[:6])}); expected model.head mlp, "
                         f"lr, star or conet (or no per-feature dim)")
    if with_source:
        ren = {f"{d}.{n}": schemas[d].feature(n).width(dim) for d in ("tgt", "src") for n in ("user_id", "item_id")}
        if len(set(ren.values())) > 1:
            raise ValueError(f"REN pairs user_id and item_id (and seq, in the item table) across the domains and "
                             f"needs one width for them, got {', '.join(f'{k}={v}' for k, v in ren.items())}; "
                             f"expected the same dim on user_id and item_id in both domains")


def shared_attributes(src: DomainSchema, tgt: DomainSchema) -> tuple[str, ...]:
    """Source features looked up in the target's (mixed network's) tables: same name, token,
    cardinality, list-ness, pooling and dim in both domains, and not an ID feature. REN keeps the
    ID tables (user_id, item_id and the sequences over item ids) separate per domain; attributes
    such as category or device mean the same thing in both domains, so the mixed network shares
    their tables (switch: ``model.share_attributes``). A source schema that declares ``shared``
    (a feature config's ``share``) shares exactly those, in the source's feature order; one that
    breaks the conditions is refused in one line."""
    if src.shared is not None:
        rule = set(shared_attributes(DomainSchema(src.domain, src.features, src.dense), tgt))
        bad = [n for n in src.shared if n not in rule]
        if bad:
            raise ValueError(f"the source schema shares {bad} but they are not attributes of the same token, "
                             f"cardinality, list-ness, pooling and dim in both domains; expected a subset of "
                             f"{sorted(rule)}")
        return tuple(f.name for f in src.features if f.name in src.shared)
    out = []
    for f in src.features:
        if f.name in ID_FEATURES:
            continue
        try:
            g = tgt.feature(f.name)
        except KeyError:
            continue
        if g.token == f.token and g.cardinality == f.cardinality and (g.multi, g.pooling, g.dim) == \
                (f.multi, f.pooling, f.dim):
            out.append(f.name)
    return tuple(out)


def synthetic_schemas(n_users: int, n_items: int, n_categories: int, n_brands: int,
                      n_cities: int = 400) -> dict[str, DomainSchema]:
    """The synthetic generator's two schemas: the source has more features per token, so SAN
    is needed (source user token: user_id, gender, age, city, device, user_level, seq; target
    user token: user_id, gender, device, seq). Ids share one global space per entity."""

    def f(name: str, token: str, card: int, table: str | None = None) -> Feature:
        return Feature(name, token, card, table or name)

    tgt = DomainSchema("tgt", (
        f("user_id", "user", n_users), f("gender", "user", 3), f("device", "user", 8),
        f("seq", "user", n_items, "item_id"),
        f("item_id", "item", n_items), f("category", "item", n_categories), f("brand", "item", n_brands),
        f("hour", "context", 24), f("position", "context", 16),
    ))
    src = DomainSchema("src", (
        f("user_id", "user", n_users), f("gender", "user", 3), f("age", "user", 8),
        f("city", "user", n_cities), f("device", "user", 8), f("user_level", "user", 10),
        f("seq", "user", n_items, "item_id"),
        f("item_id", "item", n_items), f("category", "item", n_categories), f("brand", "item", n_brands),
        f("price_level", "item", 10),
        f("hour", "context", 24), f("page", "context", 50), f("query_type", "context", 20),
    ))
    return {"tgt": tgt, "src": src}
