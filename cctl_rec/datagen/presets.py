"""Dataset presets of the synthetic generator: every knob lives here, as data.

A :class:`Preset` is the user-facing recipe (``tiny``, ``small``, ``meituan``); :func:`resolve`
applies ``--scale`` / ``--scale-ids`` and returns the :class:`GenParams` the generator runs on
(recorded verbatim in ``manifest.json`` under ``params``).

Id layout (one global space per entity, so overlap is real): target users are ids
``[0, tgt.users)``; source users are ``[tgt.users - overlap, tgt.users - overlap + src.users)``
with ``overlap = round(user_overlap * tgt.users)``. Items likewise, with every range a multiple of
``n_categories`` because an item's category is ``item_id % n_categories``.

Example::

    params = resolve("tiny", scale=0.5)
    params.tgt.samples  # 31_250
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

SPLITS = {"tgt": ("train", "valid", "test"), "src": ("train",)}


@dataclass(frozen=True, kw_only=True)
class DomainPreset:
    """Knobs of one domain.

    Args:
        users: distinct users of the domain (its id range length).
        items: distinct items of the domain (rounded up to a multiple of n_categories).
        samples: rows (target: train + valid + test; source: train only).
        ctr: mean click rate; the per-domain logit bias is calibrated to hit it.
        shift: strength of the domain-specific user-interest shift added to the shared
            interest (0 = the domain sees exactly the shared interest).
        seq_rate: mean behaviour events per user per day in this domain (drives ``seq`` length).
    """

    users: int
    items: int
    samples: int
    ctr: float
    shift: float = 0.35
    seq_rate: float = 1.0

    def __post_init__(self) -> None:
        for name in ("users", "items", "samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"domain preset: {name} must be > 0, got {getattr(self, name)}")
        if not 0.0 < self.ctr < 1.0:
            raise ValueError(f"domain preset: ctr must be in (0, 1), got {self.ctr}")
        if self.shift < 0:
            raise ValueError(f"domain preset: shift must be >= 0, got {self.shift}")


@dataclass(frozen=True, kw_only=True)
class Preset:
    """A whole synthetic dataset.

    Args:
        name: preset name.
        src / tgt: per-domain knobs.
        user_overlap: fraction of target users that also exist in the source.
        item_overlap: fraction of target items that also exist in the source.
        n_categories / n_brands / n_cities: attribute cardinalities.
        shard_rows: rows per Parquet shard (the last shard of a split may be shorter).
        row_group_rows: rows per Parquet row group.
        max_seq_len: longest ``seq`` / ``other_seq``.
        latent_dim: K, width of user and item latent vectors.
        harmful_frac: share of source rows drawn from the harmful categories, whose source
            preference is inverted relative to the target.
        harm_strength: on harmful source rows the user-item interaction is multiplied by
            ``1 - 2 * harm_strength`` (1: fully negated; 0.75, the default: -0.5, inverted
            and weaker; 0.5: no preference).
        harm_quality: on harmful source rows the item-quality effect is multiplied by
            ``1 - 2 * harm_quality`` (0, the default: untouched; 1: negated, so the harmful
            rows also teach the opposite of the target's item and category popularity: a
            first-order conflict, which a one-pass model learns long before the interaction).
        interaction: weight of the user-item interaction in the logit.
        quality: weight of the per-item quality (shared by both domains) in the logit.
        category_weight: how much of an item's latent vector is its category's centre (0..1).
        user_anchor: how much of a user's interest is the mix of its 3 favourite categories'
            centres (0..1); the rest is per-user noise.
        user_zipf / item_zipf / category_zipf: popularity exponents (Zipf, by inverse CDF).
        days: time span of the data; target splits are consecutive ``ts`` ranges.
        split_fracs: target train / valid / test fractions (rows and time alike).
    """

    name: str
    src: DomainPreset
    tgt: DomainPreset
    user_overlap: float = 0.6783
    item_overlap: float = 0.7026
    n_categories: int = 20
    n_brands: int = 200
    n_cities: int = 400
    shard_rows: int = 250_000
    row_group_rows: int = 65_536
    max_seq_len: int = 20
    latent_dim: int = 8
    harmful_frac: float = 0.3
    harm_strength: float = 0.75
    harm_quality: float = 0.0
    interaction: float = 2.0
    quality: float = 0.6
    category_weight: float = 0.8
    user_anchor: float = 0.8
    user_zipf: float = 0.6
    item_zipf: float = 0.9
    category_zipf: float = 0.5
    days: int = 30
    split_fracs: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self) -> None:
        for name in ("user_overlap", "item_overlap", "harmful_frac", "harm_strength", "harm_quality"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"preset {self.name}: {name} must be in [0, 1], got {v}")
        if self.n_categories < 2:
            raise ValueError(f"preset {self.name}: n_categories must be >= 2, got {self.n_categories}")
        if self.shard_rows < 1 or self.row_group_rows < 1 or self.max_seq_len < 1:
            raise ValueError(f"preset {self.name}: shard_rows, row_group_rows and max_seq_len "
                             f"must be >= 1")
        if abs(sum(self.split_fracs) - 1.0) > 1e-9 or min(self.split_fracs) <= 0:
            raise ValueError(f"preset {self.name}: split_fracs must be positive and sum to 1, "
                             f"got {self.split_fracs}")
        for name in ("category_weight", "user_anchor"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"preset {self.name}: {name} must be in [0, 1], "
                                 f"got {getattr(self, name)}")


PRESETS: dict[str, Preset] = {
    # Trains in seconds: ~50k target train rows, ~200k source rows. Harm fully inverted: with
    # a 6k-row test split, a weaker harm is lost in the AUC noise.
    "tiny": Preset(
        name="tiny",
        tgt=DomainPreset(users=4_000, items=1_400, samples=62_500, ctr=0.045),
        src=DomainPreset(users=5_000, items=2_000, samples=200_000, ctr=0.08, seq_rate=2.0),
        shard_rows=25_000, row_group_rows=16_384, harm_strength=1.0,
    ),
    # ~1M target train rows, ~4M source rows.
    "small": Preset(
        name="small",
        tgt=DomainPreset(users=40_000, items=7_000, samples=1_250_000, ctr=0.045),
        src=DomainPreset(users=50_000, items=9_000, samples=4_000_000, ctr=0.08, seq_rate=2.0),
    ),
    # Table 1 of the paper (industrial dataset): source 230M users / 1.1M items / 1.2B
    # samples, target 183M users / 0.7M items / 250M samples; 67.83% / 70.26% overlap.
    "meituan": Preset(
        name="meituan",
        tgt=DomainPreset(users=183_000_000, items=700_000, samples=250_000_000, ctr=0.045),
        src=DomainPreset(users=230_000_000, items=1_100_000, samples=1_200_000_000, ctr=0.08,
                         seq_rate=2.0),
    ),
}


@dataclass(frozen=True, kw_only=True)
class DomainParams:
    """A domain's resolved layout: id ranges, rows per split and calibrated bias."""

    users: int
    items: int
    user_start: int
    item_start: int
    samples: int
    ctr: float
    shift: float
    seq_rate: float
    bias: float = 0.0
    split_rows: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, kw_only=True)
class GenParams:
    """Everything the generator needs; JSON-serialisable via :meth:`to_json`."""

    preset: str
    scale: float
    scale_ids: bool
    seed: int
    src: DomainParams
    tgt: DomainParams
    n_users: int
    n_items: int
    user_overlap_ids: int
    item_overlap_ids: int
    knobs: dict[str, Any]

    def domain(self, name: str) -> DomainParams:
        return self.src if name == "src" else self.tgt

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "GenParams":
        d = dict(d)
        d["src"] = DomainParams(**d["src"])
        d["tgt"] = DomainParams(**d["tgt"])
        return GenParams(**d)


def _split_rows(total: int, fracs: tuple[float, ...]) -> list[int]:
    rows = [int(round(total * f)) for f in fracs[:-1]]
    return rows + [total - sum(rows)]


LEGACY_KNOBS = {"harm_quality": 0.0}
"""Knobs added after datasets had been generated, with the value that reproduces those datasets
(an output directory written before the knob existed resumes as if it had been given this)."""

KNOBS = ("user_overlap", "item_overlap", "harmful_frac", "harm_strength", "harm_quality", "interaction", "quality",
         "category_weight", "user_anchor", "user_zipf", "item_zipf", "category_zipf")
"""Preset fields ``cctl-rec datagen --set NAME=VALUE`` may change (floats)."""


def with_knobs(preset: str, knobs: dict[str, float]) -> Preset:
    """``preset`` with some :data:`KNOBS` replaced (checked like the preset itself)."""
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"--set {unknown[0]}: not a generator knob; expected one of {', '.join(KNOBS)}")
    return dataclasses.replace(PRESETS[preset], **knobs) if knobs else PRESETS[preset]


def resolve(preset: str, scale: float = 1.0, scale_ids: bool = False, seed: int = 0,
            knobs: Optional[dict[str, float]] = None) -> GenParams:
    """Turns a preset name and scale into :class:`GenParams` (bias not yet calibrated).

    Args:
        preset: one of :data:`PRESETS`.
        scale: multiplies every sample count (> 0).
        scale_ids: also multiply user and item counts by ``scale``.
        seed: the dataset seed.
        knobs: overrides of the preset's :data:`KNOBS` (e.g. {"harmful_frac": 0.6}).

    Returns:
        GenParams with id ranges laid out and rows per split; ``bias`` is 0 until
        :func:`datagen.generator.calibrate` fills it.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    p = with_knobs(preset, dict(knobs or {}))
    c = p.n_categories
    id_scale = scale if scale_ids else 1.0

    def n_ids(n: int, multiple: int = 1) -> int:
        n = max(multiple, int(round(n * id_scale)))
        return -(-n // multiple) * multiple

    tu, su = n_ids(p.tgt.users), n_ids(p.src.users)
    ti, si = n_ids(p.tgt.items, c), n_ids(p.src.items, c)
    ou = min(int(round(p.user_overlap * tu)), su)
    oi = min(int(round(p.item_overlap * ti / c)) * c, si)
    domains = {}
    for name, dp, users, items, ustart, istart in (
            ("tgt", p.tgt, tu, ti, 0, 0), ("src", p.src, su, si, tu - ou, ti - oi)):
        samples = max(len(SPLITS[name]), int(round(dp.samples * scale)))
        fracs = p.split_fracs if name == "tgt" else (1.0,)
        domains[name] = DomainParams(
            users=users, items=items, user_start=ustart, item_start=istart, samples=samples,
            ctr=dp.ctr, shift=dp.shift, seq_rate=dp.seq_rate,
            split_rows=dict(zip(SPLITS[name], _split_rows(samples, fracs))))
    knobs = {f.name: getattr(p, f.name) for f in dataclasses.fields(p)
             if f.name not in ("name", "src", "tgt")}
    knobs["split_fracs"] = list(p.split_fracs)
    return GenParams(preset=preset, scale=float(scale), scale_ids=bool(scale_ids), seed=int(seed),
                     src=domains["src"], tgt=domains["tgt"], n_users=tu + su - ou,
                     n_items=ti + si - oi, user_overlap_ids=ou, item_overlap_ids=oi, knobs=knobs)
