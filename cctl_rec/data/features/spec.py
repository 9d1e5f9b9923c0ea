"""The feature config: how a team's own two-domain Parquet logs become a cctl-rec dataset.

A YAML file read like the training config (``yaml.safe_load``, then the strict ``from_dict``:
unknown keys refused by their path, every value type-checked, ranges checked here). Shape::

    spaces:                      # id -> row mappings ("id spaces"); features naming one share it
      - {name: user, vocab: {min_count: 1}}          # a vocabulary from one pass over the train splits
      - {name: item, vocab: {min_count: 2}}          # ids seen < 2 times -> the OOV row 0
      - {name: city, hash: {buckets: 1000}}          # a stable hash into 1000 buckets (rows 1..1000)
      - {name: tag, hash: {buckets: 500}}
    domains:
      tgt:
        files: {train: tgt/train, valid: tgt/valid, test: tgt/test}   # under --data: file, directory or glob
        label: {column: click}                       # 0/1 (int or bool); or min_positive: 4 on a rating
        features:
          - {name: user_id, column: uid, kind: id, space: user, token: user, dtype: string}
          - {name: seq, column: hist, kind: id_list, space: item, token: user}
          - {name: item_id, column: iid, kind: id, space: item, token: item}
          - {name: city, kind: id, space: city, token: user}
          - {name: tags, kind: id_list, space: tag, token: item, pooling: sum}   # a list of ids per row
          - {name: price, kind: dense, token: item, bins: 16}   # enters the towers as its quantile bin
        other_seq: {column: books_hist}              # optional: the user's items in the other domain
      src: {...}                                     # files: {train: ...} only

Rules the model imposes (checked here, one line each):

- every domain has ``user_id`` and ``item_id`` (kind ``id``); ``seq`` (kind ``id_list``) may be left
  out (written as empty lists); ``seq`` and ``other_seq`` use the item space;
- any other ``id_list`` feature is multi-valued (tags, categories of the items in a cart): its list
  of ids is pooled (``pooling``: mean or sum) in its space's table; the ``id_list`` features of one
  space in a domain share that table and so one pooling;
- REN pairs the domains' ``user_id``, ``item_id`` and sequences, and looks target ids up in the
  source tables: the two domains' ``user_id`` (and ``item_id``) name ONE space; a top-level
  ``ren: {user: {tgt: buyer, src: viewer}, item: ..., seq: ...}`` names the features playing those
  roles instead (renamed to user_id / item_id / seq, raw columns kept; a pair of two spaces refused);
- a feature of the same name, token and space in both domains is an attribute the mixed network
  shares (``model.share_attributes``), or, with a top-level ``share: [city, ...]``, exactly those
  listed (``[]``: none; checked: both domains, one table, no ID feature);
- a domain without a context feature gets the constant ``context`` (one row), as converted data has;
- a dense feature enters the towers as the embedding of its quantile bin (``bins``, default 16),
  or with ``bins: 0`` as a float standardised with the train split's mean / std (recorded),
  concatenated after its token's pooled embeddings (docs/features.md, "Dense features").

Row 0 of every space is the out-of-vocabulary / null row: a vocabulary of V ids has V + 1 rows
(ids ordered by train count, descending, then by value), N hash buckets have N + 1 rows.

Example::

    spec = load_features("configs/features/amazon.yaml")
    spec.space("item").vocab.min_count  # 1
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

from cctl_rec.config import MAX_WIDTH, check_size, from_dict, load_yaml
from cctl_rec.schema import ID_FEATURES  # whose tables REN keeps per domain: never in ``share``

KINDS = ("id", "id_list", "dense")
REQUIRED = ("user_id", "item_id")
PAIRED = ("user_id", "item_id")
"""Features REN pairs across the domains (with ``seq`` / ``other_seq`` over the item space)."""
RESERVED = ("label", "other_seq", "user_in_other", "item_in_other", "ts", "is_harmful", "user_group")
"""Output column names a feature may not take (the layout's meta columns)."""
MAX_BUCKETS = 1 << 40
MAX_BINS = 1 << 16
SPLITS = {"tgt": ("train", "valid", "test"), "src": ("train",)}


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True, kw_only=True)
class HashSpec:
    buckets: int
    """Rows the ids are hashed into (the table gets buckets + 1 rows: row 0 is null)."""
    salt: int = 0
    """Mixed into the hash: another salt, another assignment of ids to buckets."""

    def __post_init__(self) -> None:
        _check(0 < self.buckets <= MAX_BUCKETS, f"hash.buckets must be in [1, {MAX_BUCKETS}], got {self.buckets}")
        _check(0 <= self.salt < 2 ** 63, f"hash.salt must be in [0, 2^63), got {self.salt}")


@dataclass(frozen=True, kw_only=True)
class VocabSpec:
    min_count: int = 1
    """An id seen fewer times than this in the train splits goes to the OOV row 0."""
    max_size: int = 0
    """Keep at most this many ids, the most frequent (0: no cap)."""
    path: str = ""
    """Reuse a vocabulary written by an earlier `cctl-rec prepare` (``OUT/features/vocab/<space>.parquet``)
    instead of building one: row numbers then stay those of the earlier dataset."""
    min_coverage: float = 0.5
    """With ``path``: the share of the train splits' id occurrences the reused vocabulary must
    hold; less means it was built from another dataset, and prepare refuses it."""

    def __post_init__(self) -> None:
        _check(self.min_count >= 1, f"vocab.min_count must be >= 1, got {self.min_count}")
        _check(self.max_size >= 0, f"vocab.max_size must be >= 0 (0: no cap), got {self.max_size}")
        _check(0.0 <= self.min_coverage <= 1.0, f"vocab.min_coverage must be in [0, 1], got {self.min_coverage}")


@dataclass(frozen=True, kw_only=True)
class SpaceSpec:
    """One id -> row mapping; every feature naming it (in either domain) is mapped the same way."""

    name: str
    hash: Optional[HashSpec] = None
    vocab: Optional[VocabSpec] = None

    def __post_init__(self) -> None:
        _check(bool(self.name), "spaces[].name must not be empty")
        _check((self.hash is None) != (self.vocab is None),
               f"space {self.name!r} must have exactly one of hash or vocab, got "
               f"{'both' if self.hash is not None else 'neither'}")

    @property
    def kind(self) -> str:
        return "hash" if self.hash is not None else "vocab"


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    name: str
    """The feature's name in the dataset (its Parquet column and KJT key after ``s_`` / ``t_``)."""
    column: str = ""
    """The raw column it is read from (default: ``name``)."""
    kind: Literal["id", "id_list", "dense"] = "id"
    """id: one categorical id per row; id_list: a list of ids per row (``seq``, the behaviour
    sequence, or a multi-valued feature such as tags, EasyRec's TagFeature), pooled into one
    embedding (``pooling``); dense: a number (binned, or a standardised float)."""
    space: str = ""
    """The id space (``spaces[].name``) of an id / id_list feature."""
    token: Literal["user", "item", "context", ""] = ""
    """The semantic token SAN aligns (user / item / context); ``seq`` defaults to user."""
    dtype: Literal["auto", "int64", "string"] = "auto"
    """The raw ids' type; a column of another type is refused (auto: whatever the column holds,
    integer or string; the same for every feature of a space)."""
    normalize: Literal["standard", "none"] = "standard"
    """dense with bins 0: standard = (x - mean) / std of the train split (recorded); none = as is."""
    bins: int = 16
    """dense: the feature enters the towers as the embedding of its quantile bin (EasyRec's
    ``boundaries``): bins - 1 boundaries at the train split's quantiles j / bins (both domains'
    values pooled when both have the feature; ties merged; recorded), row 0 for null. 0: written as a
    standardised float32 column (a null: the train mean, so 0) that the towers read as a float after
    the pooled embeddings of its token."""

    dim: int = 0
    """The embedding width of the feature's table: 0 = ``model.embedding_dim``; else a multiple of 4
    (fbgemm's kernels). The features of one space in a domain share a table, so the ones that set a
    dim set the same one (the others take it). A token is as wide as its features together; SAN maps
    each source token to the target token's width. REN needs one width for ``user_id`` and
    ``item_id`` in both domains; the field heads (deepfm, afm, din, minet) need every feature at
    ``model.embedding_dim`` (both refused in one line)."""
    pooling: Literal["mean", "sum"] = "mean"
    """id_list: how the list's embeddings are pooled, mean or sum (TorchRec pools per table, so the
    id_list features of one space in a domain name one pooling; single ids pool to themselves)."""

    def __post_init__(self) -> None:
        _check(self.dim == 0 or (0 < self.dim <= MAX_WIDTH and self.dim % 4 == 0),
               f"feature {self.name!r}: dim {self.dim}: expected a multiple of 4 in [4, {MAX_WIDTH}] (fbgemm's kernels "
               f"need rows of a multiple of 4), or 0 / no dim for model.embedding_dim")
        _check(self.dim == 0 or self.kind != "dense" or self.bins > 0,
               f"feature {self.name!r}: dim {self.dim} on a dense feature with bins 0: a float has no embedding; "
               f"expected no dim (or bins > 0)")
        _check(self.pooling == "mean" or self.kind == "id_list",
               f"feature {self.name!r}: pooling {self.pooling} on a kind {self.kind} feature: only a list of ids "
               f"(kind id_list) is pooled; expected no pooling key here")
        _check(bool(self.name) and self.name.isidentifier(),
               f"feature name must be an identifier (letters, digits, _), got {self.name!r}")
        _check(self.name not in RESERVED, f"feature name {self.name!r} is a reserved column name; "
                                          f"expected another name (reserved: {', '.join(RESERVED)})")
        _check(0 <= self.bins <= MAX_BINS, f"feature {self.name!r}: bins must be in [0, {MAX_BINS}], got {self.bins}")
        if self.kind == "dense":
            _check(not self.space, f"feature {self.name!r}: a dense feature has no space, got space={self.space!r}")
        else:
            _check(bool(self.space), f"feature {self.name!r}: kind {self.kind} needs a space (one of spaces[].name)")
        _check(self.name != "seq" or self.kind == "id_list", f"feature 'seq' must be kind id_list, got {self.kind}")
        _check(self.name != "context" or self.token == "context",
               f"feature 'context' must have token context, got {self.token or 'none'!r} (a domain without a context "
               f"feature gets a constant one of that name)")
        _check(self.token != "" or self.name == "seq",
               f"feature {self.name!r} needs a token: user, item or context")

    @property
    def source_column(self) -> str:
        return self.column or self.name

    @property
    def resolved_token(self) -> str:
        return self.token or "user"


@dataclass(frozen=True, kw_only=True)
class LabelSpec:
    column: str = "label"
    min_positive: Optional[float] = None
    """None: the column holds 0/1 (integer or bool). A number: label = (value >= min_positive),
    e.g. 4 on 1-5 star ratings."""


@dataclass(frozen=True, kw_only=True)
class OtherSeqSpec:
    column: str
    """A list column of the items the row's user has in the OTHER domain (mapped with the other
    domain's item space; REN's sequence term and MiNet read it)."""


@dataclass(frozen=True, kw_only=True)
class FilesSpec:
    train: str = ""
    valid: str = ""
    test: str = ""


@dataclass(frozen=True, kw_only=True)
class DomainSpec:
    files: FilesSpec = field(default_factory=FilesSpec)
    """Raw Parquet per split, relative to ``--data`` (or absolute): a file, a directory (its
    ``*.parquet``, sorted) or a glob. Default ``<domain>/<split>``."""
    label: LabelSpec = field(default_factory=LabelSpec)
    features: tuple[FeatureSpec, ...] = ()
    other_seq: Optional[OtherSeqSpec] = None

    def feature(self, name: str) -> Optional[FeatureSpec]:
        for f in self.features:
            if f.name == name:
                return f
        return None


@dataclass(frozen=True, kw_only=True)
class DomainsSpec:
    tgt: DomainSpec
    src: DomainSpec


@dataclass(frozen=True, kw_only=True)
class RenPair:
    tgt: str
    """The target feature playing the role."""
    src: str
    """The source feature playing the role."""


@dataclass(frozen=True, kw_only=True)
class RenSpec:
    """Which feature of each domain plays each of REN's three roles (Eq. 10-12: the same user's
    and the same item's ID embeddings in the two domains' tables, and the user's behaviour
    sequences). A role not listed is played by the feature named after it (user_id, item_id, seq)."""

    user: Optional[RenPair] = None
    item: Optional[RenPair] = None
    seq: Optional[RenPair] = None


REN_ROLES = {"user": ("user_id", "id"), "item": ("item_id", "id"), "seq": ("seq", "id_list")}
"""``ren`` role -> (the feature name it becomes in the dataset, the kind it needs)."""


@dataclass(frozen=True, kw_only=True)
class FeatureConfig:
    spaces: tuple[SpaceSpec, ...]
    domains: DomainsSpec
    max_seq_len: int = 20
    """Recorded in the manifest (the trainer truncates sequences to data.max_seq_len)."""
    share: Optional[tuple[str, ...]] = None
    """The attributes whose tables the two domains share in the mixed network (the source feature
    looked up in the target's table; ``model.share_attributes`` switches sharing off). Each names a
    feature both domains declare with one kind, token, space, dim and pooling (a binned dense
    feature: one ``bins``); never user_id, item_id or seq, whose tables REN keeps per domain
    (``model.share_ids`` shares them); ``context`` also names the constant context feature
    prepare adds when neither domain declares a context-token feature. Absent: every feature that
    meets those conditions (the rule of converted and synthetic data); ``[]``: none."""
    ren: Optional[RenSpec] = None
    """Which feature of each domain REN pairs as the user, the item and the behaviour sequence
    (``{user: {tgt: buyer, src: viewer}, ...}``); each pair must name one space. The named features
    become ``user_id`` / ``item_id`` / ``seq`` in the dataset (their raw columns unchanged), so a
    declared pair is the same dataset as naming the features so. Absent: the features of those names."""

    def __post_init__(self) -> None:
        if self.ren is not None:
            object.__setattr__(self, "domains", self._ren_domains())
        names = [s.name for s in self.spaces]
        _check(len(set(names)) == len(names), f"spaces: a name is used twice: {names}")
        _check(0 < self.max_seq_len <= 4096, f"max_seq_len must be in [1, 4096], got {self.max_seq_len}")
        for d in ("tgt", "src"):
            dom = self.domain(d)
            where = f"domains.{d}"
            fnames = [f.name for f in dom.features]
            _check(len(set(fnames)) == len(fnames), f"{where}.features: a name is used twice: {fnames}")
            for need in REQUIRED:
                f = dom.feature(need)
                _check(f is not None, f"{where}.features lacks {need!r} (kind id); every domain needs user_id "
                                      f"and item_id")
                _check(f.kind == "id", f"{where}.features: {need!r} must be kind id, got {f.kind}")
            for f in dom.features:
                _check(f.kind == "dense" or f.space in names,
                       f"{where}.features: {f.name!r} names space {f.space!r}; expected one of {names}")
            pools: dict[str, FeatureSpec] = {}
            for f in dom.features:
                if f.kind != "id_list":
                    continue
                first = pools.setdefault(f.space, f)
                _check(first.pooling == f.pooling,
                       f"{where}.features: {first.name!r} (pooling {first.pooling}) and {f.name!r} (pooling "
                       f"{f.pooling}) use space {f.space!r}, one table in the domain; expected one pooling per space "
                       f"(TorchRec pools per table)")
            dims: dict[str, FeatureSpec] = {}
            for f in dom.features:
                if f.kind == "dense" or not f.dim:
                    continue
                first = dims.setdefault(f.space, f)
                _check(first.dim == f.dim,
                       f"{where}.features: {first.name!r} (dim {first.dim}) and {f.name!r} (dim {f.dim}) use space "
                       f"{f.space!r}, one table in the domain; expected one dim per space")
            seq = dom.feature("seq")
            item_space = dom.feature("item_id").space
            _check(seq is None or seq.space == item_space,
                   f"{where}.features: seq uses space {seq.space if seq else ''!r} but item_id uses {item_space!r}; "
                   f"the behaviour sequence is looked up in the item table, so they must share one space")
            if d == "src":
                bad = [k for k in ("valid", "test") if getattr(dom.files, k)]
                _check(not bad, f"domains.src.files: the source has a train split only, got {bad}")
        for name in PAIRED:
            a, b = self.domains.tgt.feature(name).space, self.domains.src.feature(name).space
            _check(a == b, f"domains.tgt.features {name!r} uses space {a!r} but domains.src uses {b!r}; REN looks "
                           f"target {name} up in the source table, so both domains must name one space")
        ren = {f"domains.{d}.{n}": self.space_dim(d, self.domain(d).feature(n).space) for d in ("tgt", "src")
               for n in PAIRED}
        _check(len(set(ren.values())) == 1,
               f"REN pairs user_id and item_id (and seq, in the item table) across the domains and needs one width for "
               f"them, got dims {', '.join(f'{k}={v}' for k, v in ren.items())} (0: model.embedding_dim); expected "
               f"the same dim, or none, on user_id's and item_id's spaces in both domains")
        for f in self.domains.tgt.features:
            g = self.domains.src.feature(f.name)
            _check(not (f.kind == "dense" and g is not None and g.kind == "dense" and f.bins != g.bins),
                   f"dense feature {f.name!r} has bins {f.bins} in domains.tgt but {g.bins if g else 0} in domains.src; "
                   f"expected one binning per feature name (its train quantiles are pooled over both domains)")
        self._check_share()
        for name in names:
            dtypes = {f.dtype for d in ("tgt", "src") for f in self.domain(d).features
                      if f.space == name and f.dtype != "auto"}
            _check(len(dtypes) <= 1, f"space {name!r}: its features declare different dtypes {sorted(dtypes)}; "
                                     f"expected one (the ids of a space are one type)")

    def _ren_domains(self) -> DomainsSpec:
        """The domains with each ``ren`` pair's features renamed to their role (``column`` kept)."""
        assert self.ren is not None
        doms = {"tgt": list(self.domains.tgt.features), "src": list(self.domains.src.features)}
        for role, (target, kind) in REN_ROLES.items():
            pair = getattr(self.ren, role)
            if pair is None:
                continue
            found = {}
            for d in ("tgt", "src"):
                where = f"ren.{role}.{d}"
                name = getattr(pair, d)
                names = [f.name for f in doms[d]]
                _check(name in names, f"{where}: domains.{d}.features has no feature {name!r}; expected one of {names}")
                f = doms[d][names.index(name)]
                _check(f.kind == kind, f"{where}: feature {name!r} is kind {f.kind}; REN's {role} term pairs "
                                       f"{'one id per row' if kind == 'id' else 'the behaviour sequence'} (kind {kind})")
                _check(name == target or target not in names,
                       f"{where}: names {name!r} as REN's {role} but domains.{d}.features also declares {target!r}; "
                       f"expected one {role} feature per domain (rename or remove {target!r})")
                found[d] = f
            a, b = found["tgt"], found["src"]
            _check(a.space == b.space,
                   f"ren.{role}: domains.tgt feature {a.name!r} uses space {a.space!r} but domains.src feature "
                   f"{b.name!r} uses space {b.space!r}; REN compares a target {role}'s embedding with the same "
                   f"{role}'s in the source table, so the pair must name one space")
            for d, f in found.items():
                i = [x.name for x in doms[d]].index(f.name)
                doms[d][i] = dataclasses.replace(f, name=target, column=f.source_column)
        return DomainsSpec(tgt=dataclasses.replace(self.domains.tgt, features=tuple(doms["tgt"])),
                           src=dataclasses.replace(self.domains.src, features=tuple(doms["src"])))

    def _check_share(self) -> None:
        if self.share is None:
            return
        _check(len(set(self.share)) == len(self.share), f"share: a name is used twice: {list(self.share)}")
        for i, name in enumerate(self.share):
            where = f"share[{i}]"
            _check(name not in ID_FEATURES, f"{where}: {name!r} is an ID feature, whose tables REN keeps per domain; "
                                            f"expected an attribute (model.share_ids shares the ID tables)")
            if name == "context" and not any(x.token == "context" for d in ("tgt", "src")
                                             for x in self.domain(d).features):
                continue  # the constant context prepare adds to both domains: one row, one table
            f, g = self.domains.tgt.feature(name), self.domains.src.feature(name)
            _check(f is not None and g is not None,
                   f"{where}: feature {name!r} is not declared in both domains (domains.tgt: "
                   f"{'yes' if f is not None else 'no'}, domains.src: {'yes' if g is not None else 'no'}); expected a "
                   f"feature name of both domains' features")

            def table(x: FeatureSpec, d: str) -> str:
                if x.kind == "dense":
                    return f"kind dense, bins {x.bins}, token {x.resolved_token}"
                pool = next((y.pooling for y in self.domain(d).features if y.kind == "id_list" and y.space == x.space),
                            "mean")  # its table's: TorchRec pools per table
                return (f"kind {x.kind}, token {x.resolved_token}, space {x.space}, dim {self.space_dim(d, x.space)}, "
                        f"pooling {pool}")

            _check(not (f.kind == "dense" and f.bins == 0),
                   f"{where}: feature {name!r} is a dense float (bins 0) and has no table to share; expected an id, "
                   f"id_list or binned dense feature")
            a, b = table(f, "tgt"), table(g, "src")
            _check(a == b, f"{where}: feature {name!r} is {a} in domains.tgt but {b} in domains.src; expected one "
                           f"table: the same kind, token, space, dim and pooling in both domains")

    def domain(self, d: str) -> DomainSpec:
        return self.domains.tgt if d == "tgt" else self.domains.src

    def space_dim(self, d: str, space: str) -> int:
        """The embedding width of ``space``'s table in domain ``d``: the dim its features set, 0
        (``model.embedding_dim``) when none does."""
        return next((f.dim for f in self.domain(d).features if f.kind != "dense" and f.space == space and f.dim), 0)

    def space(self, name: str) -> SpaceSpec:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(f"no space {name!r}")

    def files(self, d: str, split: str) -> str:
        return getattr(self.domain(d).files, split) or f"{d}/{split}"


def load_features(path: str) -> FeatureConfig:
    """Reads and validates a feature config file; every problem is one ValueError naming the
    file and the key (``features file F: unknown config key 'domains.tgt.features[2].colum'; ...``)."""
    d = load_yaml(path)
    check_size(d, f"features file {path}")
    try:
        return from_dict(FeatureConfig, d)
    except TypeError as e:
        m = _MISSING.search(str(e))
        if m:  # a dataclass without a default: name the section and the key
            keys = ", ".join(k.strip("'") for k in re.findall(r"'[^']+'", m.group(2)))
            raise ValueError(f"features file {path}: {_SECTIONS.get(m.group(1), m.group(1))} lacks the required "
                             f"key(s) {keys}") from None
        raise ValueError(f"features file {path}: {e}") from None
    except ValueError as e:
        raise ValueError(f"features file {path}: {e}") from None


_MISSING = re.compile(r"(\w+)\.__init__\(\) missing \d+ required keyword-only arguments?: (.+)")
_SECTIONS = {"FeatureConfig": "the top level", "DomainsSpec": "domains", "SpaceSpec": "a spaces[] entry",
             "HashSpec": "a hash mapping", "RenPair": "a ren pair", "FeatureSpec": "a features[] entry", "OtherSeqSpec": "other_seq"}
