"""The two domains' features, grouped into the paper's semantic tokens (user / item / context).

Every dataset (synthetic or converted) carries its schema in ``manifest.json``; this module is
the one place that turns it into embedding tables and KeyedJaggedTensor keys.

Parquet columns of a domain's rows:

- one integer column per categorical feature (``user_id``, ``item_id``, ``gender`` ...);
- ``seq``: list<int64>, the user's recent items **in this domain** (newest last);
- ``other_seq``: list<int64>, the user's recent items in the other domain (empty when absent);
- ``user_in_other`` / ``item_in_other``: bool, the entity exists in the other domain (REN mask);
- ``label``: int8 in {0, 1}; ``ts``: int64 time-like order key;
- ``is_harmful`` (source only, optional): ground truth for analysis, never a model feature.

KJT keys and table names are prefixed by the domain: ``t_`` target, ``s_`` source. The sequence
features share their domain's item table (``t_seq`` -> table ``t_item_id``) and are MEAN pooled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

TOKENS = ("user", "item", "context")
DOMAINS = ("src", "tgt")
PREFIX = {"src": "s_", "tgt": "t_"}
# Non-feature columns every domain file has; ``is_harmful`` may follow in the source.
META_COLUMNS = ("label", "ts", "other_seq", "user_in_other", "item_in_other")
SEQ_COLUMN = "seq"

Token = Literal["user", "item", "context"]


@dataclass(frozen=True)
class Feature:
    """One categorical feature.

    Args:
        name: Parquet column name (``seq`` for the behaviour sequence).
        token: the semantic token it belongs to: user, item or context.
        cardinality: ids are in [0, cardinality).
        table: the embedding table it is looked up in (``item_id`` for ``seq``).
    """

    name: str
    token: str
    cardinality: int
    table: str

    def __post_init__(self) -> None:
        if self.token not in TOKENS:
            raise ValueError(f"feature {self.name}: token must be one of {TOKENS}, got {self.token!r}")
        if self.cardinality <= 0:
            raise ValueError(f"feature {self.name}: cardinality must be > 0, got {self.cardinality}")

    @property
    def is_seq(self) -> bool:
        return self.name == SEQ_COLUMN


@dataclass(frozen=True)
class DomainSchema:
    """The features of one domain, in token order.

    Args:
        domain: ``src`` or ``tgt``.
        features: every categorical feature, ``seq`` included.
    """

    domain: str
    features: tuple[Feature, ...]

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        names = [f.name for f in self.features]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.domain} schema repeats a feature: {names}")
        for need in ("user_id", "item_id", SEQ_COLUMN):
            if need not in names:
                raise ValueError(f"{self.domain} schema lacks the required feature '{need}'")
        tables = {f.table: f.cardinality for f in self.features if not f.is_seq}
        seq = self.feature(SEQ_COLUMN)
        if seq.table not in tables:
            raise ValueError(f"{self.domain}: seq must share an id table, got table {seq.table!r}")

    @property
    def prefix(self) -> str:
        return PREFIX[self.domain]

    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"{self.domain} schema has no feature {name!r}")

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
            card = self.feature(f.table).cardinality if f.is_seq else f.cardinality
            rows, keys = out.setdefault(self.prefix + f.table, (card, []))
            keys.append(self.prefix + f.name)
        return [(name, rows, keys) for name, (rows, keys) in out.items()]

    def keys_without(self, exclude: tuple[str, ...]) -> list[str]:
        """KJT keys of the features not in ``exclude``."""
        return [self.prefix + f.name for f in self.features if f.name not in exclude]

    def token_features(self, token: str) -> list[str]:
        """KJT keys of a token, in order; ``seq`` belongs to the user token."""
        return [self.prefix + f.name for f in self.features if f.token == token]

    def token_width(self, token: str, dim: int) -> int:
        return dim * len(self.token_features(token))

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain,
                "features": [{"name": f.name, "token": f.token, "cardinality": f.cardinality,
                              "table": f.table} for f in self.features]}

    @staticmethod
    def from_json(d: dict[str, Any]) -> "DomainSchema":
        try:
            feats = tuple(Feature(str(x["name"]), str(x["token"]), int(x["cardinality"]), str(x["table"]))
                          for x in d["features"])
            return DomainSchema(str(d["domain"]), feats)
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed domain schema in manifest: missing {e}") from None


ID_FEATURES = ("user_id", "item_id", SEQ_COLUMN)


def shared_attributes(src: DomainSchema, tgt: DomainSchema) -> tuple[str, ...]:
    """Source features looked up in the target's (mixed network's) tables: same name, token and
    cardinality in both domains, and not an ID feature. REN keeps the ID tables (user_id, item_id
    and the sequences over item ids) separate per domain; attributes such as category or device
    mean the same thing in both domains, so the mixed network shares their tables (switch:
    ``model.share_attributes``)."""
    out = []
    for f in src.features:
        if f.name in ID_FEATURES:
            continue
        try:
            g = tgt.feature(f.name)
        except KeyError:
            continue
        if g.token == f.token and g.cardinality == f.cardinality:
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
