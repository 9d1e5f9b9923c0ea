"""The generative model: one shard of rows of one domain, as a pyarrow Table.

Model (all per-id quantities come from :mod:`cctl_rec.datagen.hashing`, so nothing is stored per id):

- user ``u`` has three favourite categories and a shared interest ``z_u`` (K factors) built
  from their centres plus noise; in domain ``d`` it sees
  ``z_u^d = (z_u + shift_d * e_u^d) / sqrt(1 + shift_d^2)`` (``e_u^d``: domain-specific shift);
- item ``i`` has category ``c = i % C``, latent ``v_i = w * centre_c + sqrt(1 - w^2) * n_i`` and
  a quality ``q_i``, both shared by the two domains (an overlapping item is the same item);
- an impression draws its user by Zipf popularity, its category from the domain's category mix
  and its item by Zipf popularity inside the category; in the source a share ``harmful_frac``
  of rows is drawn from the *harmful categories*, where the source preference is inverted;
- ``logit = bias_d + a * s * <z_u^d, v_i> / sqrt(K) + b * q_i + hour + position/device``, with
  ``s = 1 - 2 * harm_strength`` on harmful rows and 1 elsewhere; ``label ~ Bernoulli``;
- ``seq`` is the user's behaviour stream in the domain up to ``ts`` (items of the user's
  favourite categories, newest last); ``other_seq`` the same stream in the other domain.

Example::

    params = calibrate(resolve("tiny"))
    gen = Generator(params)
    cols = schemas_of(params)["tgt"].columns  # datagen.pipeline.schemas_of
    table = gen.shard_table("tgt", "train", 0, 1000, T0, T0 + DAY, cols)  # 1000 rows
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pyarrow as pa

from cctl_rec.datagen.hashing import (coprime_multiplier, hash_factors, hash_uniform, permute, salt_of,
                             splitmix64, zipf_rank, zipf_rank32)
from cctl_rec.datagen.presets import GenParams

logger = logging.getLogger(__name__)

T0 = 1_672_531_200  # 2023-01-01 00:00 UTC: ts are seconds from here
DAY = 86_400
DOMAIN_CODE = {"tgt": 1, "src": 2}
SPLIT_CODE = {"train": 1, "valid": 2, "test": 3, "calibrate": 9}
OTHER = {"src": "tgt", "tgt": "src"}
TOP_WEIGHTS = (0.55, 0.30, 0.15)  # how a behaviour picks among the user's 3 favourites
EXPLORE = 0.15  # share of behaviours on a category drawn from the domain mix instead
SEQ_BLOCK_ROWS = 2048  # rows per sequence block: keeps the temporaries in cache (about 3x faster)
META_COLUMNS = ("other_seq", "user_in_other", "item_in_other", "label", "ts")
HOUR_EFFECT = 0.3 * np.cos((np.arange(24) - 20) * (2 * math.pi / 24))  # logit term by hour


def _count_le(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``np.searchsorted(cdf, u, side="right")`` (how many ``cdf`` entries are <= u): one
    comparison pass per entry, ~4x faster than the binary search for the 20 categories."""
    if len(cdf) > 64:
        return np.searchsorted(cdf, u, side="right")
    out = np.zeros(len(u), dtype=np.int64)
    for c in cdf:
        out += u >= c
    return out


def schemas_of(params: GenParams) -> dict[str, Any]:
    """The two DomainSchemas of a run (cctl_rec.schema.synthetic_schemas with its sizes)."""
    from cctl_rec.schema import synthetic_schemas

    k = params.knobs
    return synthetic_schemas(params.n_users, params.n_items, int(k["n_categories"]),
                             int(k["n_brands"]), int(k["n_cities"]))


def id_type(cardinality: int) -> pa.DataType:
    """Arrow type of an id column with ids in ``[0, cardinality)``: int32, or int64 beyond."""
    return pa.int32() if cardinality <= 2 ** 31 else pa.int64()


def arrow_schema(schema: Any, domain: str) -> pa.Schema:
    """The on-disk Arrow schema of a domain's shards (column order as written).

    Every feature column is an id type (:func:`id_type` of its table's cardinality; ``seq`` and
    ``other_seq`` are ``list<id>`` of the item table), then ``user_in_other`` / ``item_in_other``
    (bool), ``label`` (int8), ``ts`` (int64 seconds) and, in the source, ``is_harmful`` (bool).
    No column holds nulls, so every field is declared non-nullable.
    """
    item = id_type(schema.feature("item_id").cardinality)
    fields = []
    for f in schema.features:
        if f.is_seq:
            fields.append(pa.field(f.name, pa.list_(pa.field("item", item, nullable=False)),
                                   nullable=False))
        else:
            fields.append(pa.field(f.name, id_type(f.cardinality), nullable=False))
    fields += [pa.field("other_seq", pa.list_(pa.field("item", item, nullable=False)),
                        nullable=False),
               pa.field("user_in_other", pa.bool_(), nullable=False),
               pa.field("item_in_other", pa.bool_(), nullable=False),
               pa.field("label", pa.int8(), nullable=False),
               pa.field("ts", pa.int64(), nullable=False)]
    if domain == "src":
        fields.append(pa.field("is_harmful", pa.bool_(), nullable=False))
    return pa.schema(fields)


class Generator:
    """Generates rows of both domains from :class:`GenParams` (deterministic per shard).

    Args:
        params: resolved (and calibrated) generator parameters.
    """

    def __init__(self, params: GenParams) -> None:
        self.p = params
        k = params.knobs
        self.C = int(k["n_categories"])
        self.K = int(k["latent_dim"])
        self.max_seq_len = int(k["max_seq_len"])
        s = params.seed
        self.salt = {name: salt_of(s, i) for i, name in enumerate(
            ("user", "item", "quality", "centre", "uattr", "iattr", "device_eff", "harmful",
             "fav"))}
        self.centres = hash_factors(np.arange(self.C, dtype=np.uint64), self.salt["centre"], self.K)
        # the items' and users' category terms, precomputed with the same float32 operations
        # (so the same values) as computing them per row: w * centre, and rho-scaled anchors
        # 0.6 c1 + 0.3 c2 + 0.1 c3 of every favourite triple when there are few enough
        self.centres_w = np.float32(k["category_weight"]) * self.centres
        self.anchors = None
        if self.C ** 3 <= 1 << 16:
            f = np.arange(self.C ** 3)
            self.anchors = self._anchor(np.stack([f // (self.C * self.C), f // self.C % self.C,
                                                  f % self.C], axis=1))
        self.device_effect = 0.3 * (hash_uniform(np.arange(8, dtype=np.uint64),
                                                 self.salt["device_eff"]) - 0.5)
        n_harm = int(round(k["harmful_frac"] * self.C))
        order = np.argsort(hash_uniform(np.arange(self.C, dtype=np.uint64), self.salt["harmful"]))
        self.harmful_categories = np.sort(order[:n_harm])
        self.is_harmful_category = np.zeros(self.C, dtype=bool)
        self.is_harmful_category[self.harmful_categories] = True
        self.dom: dict[str, dict[str, Any]] = {d: self._domain_setup(d) for d in ("src", "tgt")}
        schemas = schemas_of(params)
        self.arrow_schemas = {d: arrow_schema(schemas[d], d) for d in ("src", "tgt")}

    def _domain_setup(self, d: str) -> dict[str, Any]:
        dp, k, code = self.p.domain(d), self.p.knobs, DOMAIN_CODE[d]
        s = self.p.seed
        per_cat = dp.items // self.C
        # category mix: Zipf over a domain-specific popularity order of the categories
        order = np.argsort(hash_uniform(np.arange(self.C, dtype=np.uint64), salt_of(s, 50, code)))
        w = np.empty(self.C)
        w[order] = (np.arange(self.C) + 1.0) ** -float(k["category_zipf"])
        w /= w.sum()
        setup = {"per_cat": per_cat, "mix_cdf": np.cumsum(w), "mix": w,
                 "a_item": coprime_multiplier(per_cat), "a_user": coprime_multiplier(dp.users),
                 "b_user": int(salt_of(s, 51, code) % dp.users),
                 "shift_salt": salt_of(s, 52, code), "seq_salt": salt_of(s, 53, code),
                 "act_salt": salt_of(s, 54, code),
                 # (cat * 7919 + 13) % per_cat: the item permutation's offset per category
                 "b_item": (np.arange(self.C, dtype=np.int64) * 7919 + 13) % per_cat}
        if d == "src":
            h = self.is_harmful_category
            frac = float(k["harmful_frac"])
            for name, mask, mass in (("harm_cdf", h, frac), ("clean_cdf", ~h, 1.0 - frac)):
                ww = np.where(mask, w, 0.0)
                setup[name] = np.cumsum(ww / ww.sum()) if ww.sum() > 0 and mass > 0 else None
        return setup

    # ---- per-id quantities -------------------------------------------------------------
    def favourites(self, uid: np.ndarray) -> np.ndarray:
        """``N X 3`` int64: the user's favourite categories (shared by both domains), best first."""
        h = splitmix64(uid, self.salt["fav"])
        lanes = h.view(np.uint16).reshape(len(uid), 4).astype(np.int64)
        lanes %= self.C  # on all 4 lanes: contiguous, ~3x faster than on the 3-lane view
        return lanes[:, :3]

    def user_latent(self, d: str, uid: np.ndarray, fav: np.ndarray | None = None,
                    noise: np.ndarray | None = None) -> np.ndarray:
        """``N X K`` float32: the user's interest as seen in domain ``d``.

        ``z_u = rho * anchor(favourites) + sqrt(1 - rho^2) * noise_u`` (shared), then the
        domain shift: ``(z_u + shift_d * e_u^d) / sqrt(1 + shift_d^2)``.

        Args:
            fav: :meth:`favourites` of ``uid`` if already computed.
            noise: ``hash_factors(uid, salt["user"], K)`` if already computed (overwritten).
        """
        rho = float(self.p.knobs["user_anchor"])
        shift = self.p.domain(d).shift
        fav = self.favourites(uid) if fav is None else fav
        z = hash_factors(uid, self.salt["user"], self.K) if noise is None else noise
        z *= np.float32(math.sqrt(1.0 - rho * rho))
        if self.anchors is not None:
            combo = fav[:, 0] * self.C
            combo += fav[:, 1]
            combo *= self.C
            combo += fav[:, 2]
            z += np.take(self.anchors, combo, axis=0)
        else:
            z += self._anchor(fav)
        if shift > 0:
            z += np.float32(shift) * hash_factors(uid, self.dom[d]["shift_salt"], self.K)
            z *= np.float32(1.0 / math.sqrt(1.0 + shift * shift))
        return z

    def _anchor(self, fav: np.ndarray) -> np.ndarray:
        """``N X K``: ``rho / sqrt(0.46) * (0.6 c1 + 0.3 c2 + 0.1 c3)`` of favourite triples."""
        rho = float(self.p.knobs["user_anchor"])
        anchor = self.centres[fav[:, 0]] * np.float32(0.6)
        anchor += self.centres[fav[:, 1]] * np.float32(0.3)
        anchor += self.centres[fav[:, 2]] * np.float32(0.1)
        return anchor * np.float32(rho / math.sqrt(0.46))

    def item_latent(self, iid: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """``N X K`` float32 item vectors: category centre plus item noise."""
        w = float(self.p.knobs["category_weight"])
        v = hash_factors(iid, self.salt["item"], self.K)
        v *= np.float32(math.sqrt(max(0.0, 1.0 - w * w)))
        v += np.take(self.centres_w, cat, axis=0)
        return v

    def _activity(self, d: str, uid: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Events of the user in domain ``d`` before ``ts`` and its events-per-day rate."""
        f = hash_factors(uid, self.dom[d]["act_salt"], 2)
        rate = self.p.domain(d).seq_rate * np.exp(0.8 * f[:, 0]) / 1.36
        warm = (f[:, 1] + 1.7320508) * (0.43 * self.max_seq_len)  # history before the window
        n = (warm + rate * ((ts - T0) / DAY)).astype(np.int64)
        return n, rate

    def _items_in(self, d: str, cat: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Item ids of category ``cat`` in domain ``d`` by Zipf popularity (``u`` uniforms)."""
        ds = self.dom[d]
        per_cat = ds["per_cat"]
        j = zipf_rank(u, per_cat, float(self.p.knobs["item_zipf"]))
        j = permute(j, per_cat, ds["a_item"], cat * 7919 + 13)
        j *= self.C
        j += cat
        j += self.p.domain(d).item_start
        return j

    def _category_lut(self, d: str) -> np.ndarray:
        """4096-entry table: 12 hash bits -> favourite slot (0..2) or 3 + explored category."""
        if "lut" not in self.dom[d]:
            u = (np.arange(4096) + 0.5) / 4096
            explore = 3 + np.searchsorted(self.dom[d]["mix_cdf"], u / EXPLORE, side="right")
            slot = ((u >= EXPLORE + (1 - EXPLORE) * TOP_WEIGHTS[0]).astype(np.int64)
                    + (u >= EXPLORE + (1 - EXPLORE) * (TOP_WEIGHTS[0] + TOP_WEIGHTS[1])))
            self.dom[d]["lut"] = np.where(u < EXPLORE, np.minimum(explore, 3 + self.C - 1), slot)
        return self.dom[d]["lut"]

    def sequences(self, d: str, uid: np.ndarray, ts: np.ndarray, fav: np.ndarray,
                  present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The users' behaviour in domain ``d`` before ``ts``: (offsets int32, item ids, n events).

        Event ``k`` of user ``u`` is a pure function of (seed, domain, u, k), so rows of the same
        user see one consistent history. Rows whose ``present`` is False get an empty sequence.
        An event's hash gives its category (top 12 bits, :meth:`_category_lut`) and its item in
        that category (low 32 bits: Zipf rank by :func:`zipf_rank32`, then the category's
        permutation of :meth:`_items_in`).

        Args:
            fav: ``N X 3`` favourite categories of ``uid`` (:meth:`favourites`).
        """
        n_ev, _ = self._activity(d, uid, ts)
        length = np.minimum(n_ev, self.max_seq_len)
        if present is not None:
            length[~present] = 0
        offsets = np.zeros(len(uid) + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        item_type = self.arrow_schemas[d].field("seq").type.value_type.to_pandas_dtype()
        values = np.empty(int(offsets[-1]), dtype=item_type)
        if len(values) == 0:
            return offsets.astype(np.int32), values, n_ev
        # key of element e of row r: (uid << 20) + first event index + (e - offsets[r])
        base = (uid.astype(np.uint64) << np.uint64(20)) + (n_ev - length - offsets[:-1]).astype(np.uint64)
        ds, dp = self.dom[d], self.p.domain(d)
        lut, salt = self._category_lut(d), ds["seq_salt"]
        per_cat, a, C = ds["per_cat"], ds["a_item"], self.C
        zipf_s = float(self.p.knobs["item_zipf"])
        # item of rank r in category c: ((r * a + b_c) % per_cat) * C + c + item_start with
        # b_c = (c * 7919 + 13) % per_cat, as in _items_in; exact in uint32 while
        # per_cat ** 2 < 2 ** 32 and the ids fit int32, else in int64 (float64 ranks)
        narrow = per_cat < 1 << 16 and item_type == np.int32
        wide = np.uint32 if narrow else np.int64
        # per-row tables over the lut's codes (0..2: the row's favourites, 3 + c: category c)
        # holding b_c and c + item_start: an event needs one gather at row * width + code each
        width = 3 + C
        step = SEQ_BLOCK_ROWS
        b_tab = np.empty((step, width), dtype=wide)
        c_tab = np.empty((step, width), dtype=wide)
        b_tab[:, 3:] = ds["b_item"]
        c_tab[:, 3:] = np.arange(C) + dp.item_start
        fav_b, fav_c = np.take(ds["b_item"], fav), fav + dp.item_start
        row_start = np.arange(0, step * width, width, dtype=np.int64)
        for lo in range(0, len(uid), step):
            hi = min(lo + step, len(uid))
            e0, e1 = int(offsets[lo]), int(offsets[hi])
            if e1 == e0:
                continue
            n_rows = length[lo:hi]
            key = np.repeat(base[lo:hi], n_rows)
            key += np.arange(e0, e1, dtype=np.uint64)
            h = splitmix64(key, salt)
            b_tab[:hi - lo, :3] = fav_b[lo:hi]
            c_tab[:hi - lo, :3] = fav_c[lo:hi]
            idx = np.repeat(row_start[:hi - lo], n_rows)
            idx += np.take(lut, (h >> np.uint64(52)).view(np.int64))
            if narrow:
                j = zipf_rank32(h.astype(np.uint32), per_cat, zipf_s).view(np.uint32)
                j *= np.uint32(a)
                out = values[e0:e1].view(np.uint32)
            else:
                u = (h & np.uint64(0xFFFFFFFF)).astype(np.float64) * (1.0 / 4294967296.0)
                j = zipf_rank(u, per_cat, zipf_s) * np.int64(a)
                out = values[e0:e1]
            j += np.take(b_tab.reshape(-1), idx)
            np.remainder(j, wide(per_cat), out=j)
            j *= wide(C)
            np.add(j, np.take(c_tab.reshape(-1), idx), out=out, casting="unsafe")
        return offsets.astype(np.int32), values, n_ev

    # ---- rows --------------------------------------------------------------------------
    def columns(self, d: str, rng: np.random.Generator, rows: int, ts_lo: int, ts_hi: int,
                with_seq: bool = True) -> dict[str, Any]:
        """All columns of ``rows`` impressions of domain ``d`` with ts in ``[ts_lo, ts_hi)``.

        Returns a dict of numpy arrays (``seq`` / ``other_seq`` as (offsets, values)) plus
        ``logit_nobias`` for calibration.
        """
        dp, ds, k = self.p.domain(d), self.dom[d], self.p.knobs
        o = OTHER[d]
        ts = np.sort(rng.integers(ts_lo, ts_hi, rows, dtype=np.int64))
        r = zipf_rank(rng.random(rows), dp.users, float(k["user_zipf"]))
        uid = dp.user_start + permute(r, dp.users, ds["a_user"], ds["b_user"])
        u_cat = rng.random(rows)
        if d == "src":
            harmful = rng.random(rows) < float(k["harmful_frac"])
            cat = np.empty(rows, dtype=np.int64)
            for mask, cdf in ((harmful, ds["harm_cdf"]), (~harmful, ds["clean_cdf"])):
                if cdf is not None and mask.any():
                    cat[mask] = _count_le(cdf, u_cat[mask])
            np.clip(cat, 0, self.C - 1, out=cat)
            harmful = self.is_harmful_category[cat]
        else:
            cat = _count_le(ds["mix_cdf"], u_cat).clip(0, self.C - 1)
            harmful = None
        iid = self._items_in(d, cat, rng.random(rows))

        fav = self.favourites(uid)
        noise = hash_factors(uid, self.salt["user"], self.K)
        zs = noise[:, :2].copy()  # == hash_factors(uid, salt["user"], 2): gender and age
        z = self.user_latent(d, uid, fav, noise)
        v = self.item_latent(iid, cat)
        inter = np.einsum("ij,ij->i", z, v) * (1.0 / math.sqrt(self.K))
        quality = hash_factors(iid, self.salt["quality"], 1)[:, 0]
        if harmful is not None:
            inter = inter * np.where(harmful, 1.0 - 2.0 * float(k["harm_strength"]), 1.0)
            quality = quality * np.where(harmful, 1.0 - 2.0 * float(k["harm_quality"]), 1.0)
        hour = ((ts - T0) // 3600) % 24
        ua = splitmix64(uid, self.salt["uattr"])
        device = ((ua >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.int64) % 8
        logit = (float(k["interaction"]) * inter + float(k["quality"]) * quality
                 + np.take(HOUR_EFFECT, hour) + np.take(self.device_effect, device))
        cols: dict[str, Any] = {"user_id": uid, "item_id": iid, "category": cat, "hour": hour,
                                "device": device, "ts": ts}
        if d == "tgt":
            pos = (np.log1p(-rng.random(rows)) * (1 / math.log(0.8))).astype(np.int64).clip(0, 15)
            logit -= 0.05 * pos
            cols["position"] = pos
        else:
            cols["page"] = zipf_rank(rng.random(rows), 50, 1.0)
            cols["query_type"] = rng.integers(0, 20, rows, dtype=np.int64)
            cols["is_harmful"] = harmful
        cols["logit_nobias"] = logit
        u_label = rng.random(rows)
        cols["label"] = (u_label * (1.0 + np.exp(-(logit + dp.bias))) < 1.0).astype(np.int8)

        # user attributes (gender and age follow the interest, so they carry signal)
        gender = np.where(zs[:, 0] > 0, 1, 2)
        gender[(ua & np.uint64(0xFFFF)) < 6554] = 0  # ~10% unknown
        cols["gender"] = gender.astype(np.int64)
        cols["age"] = ((zs[:, 1] + 1.7320508) * (8 / 3.4641017)).astype(np.int64).clip(0, 7)
        cols["city"] = ((ua >> np.uint64(32)).astype(np.int64)) % int(k["n_cities"])
        # item attributes: brand nests in the category, price from the item hash
        ia = splitmix64(iid, self.salt["iattr"])
        nb, c = int(k["n_brands"]), self.C
        per = max(1, nb // c)
        cols["brand"] = (cat * per + (ia & np.uint64(0xFFFF)).astype(np.int64) % per) % nb
        cols["price_level"] = (ia >> np.uint64(60)).astype(np.int64) % 10

        user_in_other = self._in_other_users(d, uid)
        cols["user_in_other"] = user_in_other
        cols["item_in_other"] = self._in_other_items(d, iid)
        if with_seq:
            off, val, n_ev = self.sequences(d, uid, ts, fav)
            cols["seq"] = (off, val)
            cols["user_level"] = np.minimum(9, np.log2(1 + n_ev).astype(np.int64))
            off_o, val_o, _ = self.sequences(o, uid, ts, fav, present=user_in_other)
            cols["other_seq"] = (off_o, val_o)
        return cols

    def _in_other_users(self, d: str, uid: np.ndarray) -> np.ndarray:
        op = self.p.domain(OTHER[d])
        return (uid >= op.user_start) & (uid < op.user_start + op.users)

    def _in_other_items(self, d: str, iid: np.ndarray) -> np.ndarray:
        op = self.p.domain(OTHER[d])
        return (iid >= op.item_start) & (iid < op.item_start + op.items)

    def shard_table(self, d: str, split: str, shard: int, rows: int, ts_lo: int, ts_hi: int,
                    columns: list[str]) -> pa.Table:
        """One shard as a Table with ``columns`` (schema order) then the meta columns.

        The shard's RNG is seeded from (seed, domain, split, shard) only.
        """
        rng = np.random.default_rng([self.p.seed, DOMAIN_CODE[d], SPLIT_CODE[split], shard])
        cols = self.columns(d, rng, rows, ts_lo, ts_hi)
        full = self.arrow_schemas[d]
        names = list(columns) + list(META_COLUMNS) + (["is_harmful"] if d == "src" else [])
        schema = pa.schema([full.field(name) for name in names])
        arrays = []
        for field in schema:
            x = cols[field.name]
            if isinstance(x, tuple):  # (offsets, values): zero-copy list array
                arrays.append(pa.ListArray.from_arrays(pa.array(x[0]), pa.array(x[1]),
                                                       type=field.type))
            else:
                dtype = field.type.to_pandas_dtype()
                arrays.append(pa.array(x.astype(dtype, copy=False)))
        return pa.Table.from_arrays(arrays, schema=schema)


def calibrate(params: GenParams, rows: int = 200_000) -> GenParams:
    """Sets each domain's logit bias so that its mean CTR equals the preset's ``ctr``.

    Args:
        params: resolved parameters (bias ignored).
        rows: impressions simulated per domain.

    Returns:
        A copy of ``params`` with ``bias`` filled in per domain.
    """
    import dataclasses

    gen = Generator(params)
    new = {}
    for d in ("src", "tgt"):
        dp = params.domain(d)
        rng = np.random.default_rng([params.seed, DOMAIN_CODE[d], SPLIT_CODE["calibrate"]])
        x = gen.columns(d, rng, rows, T0, T0 + DAY * int(params.knobs["days"]),
                        with_seq=False)["logit_nobias"]
        b = math.log(dp.ctr / (1 - dp.ctr))
        for _ in range(50):  # Newton on mean(sigmoid(b + x)) = ctr
            pr = 1.0 / (1.0 + np.exp(-(b + x)))
            f, df = pr.mean() - dp.ctr, (pr * (1 - pr)).mean()
            b -= f / df
            if abs(f) < 1e-7:
                break
        new[d] = dataclasses.replace(dp, bias=round(float(b), 6))
        logger.debug("calibrated %s bias %.4f for ctr %.4f", d, b, dp.ctr)
    return dataclasses.replace(params, src=new["src"], tgt=new["tgt"])
