"""The generative model: one shard of rows of one domain, as a pyarrow Table.

Model (all per-id quantities come from :mod:`datagen.hashing`, so nothing is stored per id):

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

from datagen.hashing import (coprime_multiplier, hash_factors, hash_uniform, permute, salt_of,
                             splitmix64, zipf_rank)
from datagen.presets import GenParams

logger = logging.getLogger(__name__)

T0 = 1_672_531_200  # 2023-01-01 00:00 UTC: ts are seconds from here
DAY = 86_400
DOMAIN_CODE = {"tgt": 1, "src": 2}
SPLIT_CODE = {"train": 1, "valid": 2, "test": 3, "calibrate": 9}
OTHER = {"src": "tgt", "tgt": "src"}
TOP_WEIGHTS = (0.55, 0.30, 0.15)  # how a behaviour picks among the user's 3 favourites
EXPLORE = 0.15  # share of behaviours on a category drawn from the domain mix instead


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
        self.device_effect = 0.3 * (hash_uniform(np.arange(8, dtype=np.uint64),
                                                 self.salt["device_eff"]) - 0.5)
        n_harm = int(round(k["harmful_frac"] * self.C))
        order = np.argsort(hash_uniform(np.arange(self.C, dtype=np.uint64), self.salt["harmful"]))
        self.harmful_categories = np.sort(order[:n_harm])
        self.is_harmful_category = np.zeros(self.C, dtype=bool)
        self.is_harmful_category[self.harmful_categories] = True
        self.dom: dict[str, dict[str, Any]] = {d: self._domain_setup(d) for d in ("src", "tgt")}

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
                 "act_salt": salt_of(s, 54, code)}
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
        lanes = h.view(np.uint16).reshape(len(uid), 4)[:, :3]
        return lanes.astype(np.int64) % self.C

    def user_latent(self, d: str, uid: np.ndarray) -> np.ndarray:
        """``N X K`` float32: the user's interest as seen in domain ``d``.

        ``z_u = rho * anchor(favourites) + sqrt(1 - rho^2) * noise_u`` (shared), then the
        domain shift: ``(z_u + shift_d * e_u^d) / sqrt(1 + shift_d^2)``.
        """
        rho = float(self.p.knobs["user_anchor"])
        shift = self.p.domain(d).shift
        fav = self.favourites(uid)
        anchor = self.centres[fav[:, 0]] * np.float32(0.6)
        anchor += self.centres[fav[:, 1]] * np.float32(0.3)
        anchor += self.centres[fav[:, 2]] * np.float32(0.1)
        z = hash_factors(uid, self.salt["user"], self.K)
        z *= np.float32(math.sqrt(1.0 - rho * rho))
        z += anchor * np.float32(rho / math.sqrt(0.46))
        if shift > 0:
            z += np.float32(shift) * hash_factors(uid, self.dom[d]["shift_salt"], self.K)
            z *= np.float32(1.0 / math.sqrt(1.0 + shift * shift))
        return z

    def item_latent(self, iid: np.ndarray, cat: np.ndarray) -> np.ndarray:
        """``N X K`` float32 item vectors: category centre plus item noise."""
        w = float(self.p.knobs["category_weight"])
        v = hash_factors(iid, self.salt["item"], self.K)
        v *= np.float32(math.sqrt(max(0.0, 1.0 - w * w)))
        v += np.float32(w) * self.centres[cat]
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

    def sequences(self, d: str, uid: np.ndarray, ts: np.ndarray,
                  present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The users' behaviour in domain ``d`` before ``ts``: (offsets int32, item ids, n events).

        Event ``k`` of user ``u`` is a pure function of (seed, domain, u, k), so rows of the same
        user see one consistent history. Rows whose ``present`` is False get an empty sequence.
        """
        n_ev, _ = self._activity(d, uid, ts)
        length = np.minimum(n_ev, self.max_seq_len)
        if present is not None:
            length = np.where(present, length, 0)
        offsets = np.zeros(len(uid) + 1, dtype=np.int64)
        np.cumsum(length, out=offsets[1:])
        values = np.empty(int(offsets[-1]), dtype=np.int64)
        if len(values) == 0:
            return offsets.astype(np.int32), values, n_ev
        # key of element e of row r: (uid << 20) + first event index + (e - offsets[r])
        base = (uid.astype(np.uint64) << np.uint64(20)) + (n_ev - length - offsets[:-1]).astype(np.uint64)
        top_flat = self.favourites(uid).ravel()
        lut, salt = self._category_lut(d), self.dom[d]["seq_salt"]
        step = 2048  # rows per block: keeps the temporaries in cache (about 3x faster)
        for lo in range(0, len(uid), step):
            hi = min(lo + step, len(uid))
            e0, e1 = int(offsets[lo]), int(offsets[hi])
            if e1 == e0:
                continue
            row = np.repeat(np.arange(lo, hi), length[lo:hi])
            key = base[row] + np.arange(e0, e1, dtype=np.uint64)
            h = splitmix64(key, salt)
            u_item = h.view(np.uint32)[::2].astype(np.float64)
            u_item *= 1.0 / 4294967296.0
            code = lut[(h >> np.uint64(52)).astype(np.intp)]
            row *= 3
            row += np.minimum(code, 2)
            cat = np.where(code < 3, top_flat[row], code - 3)
            values[e0:e1] = self._items_in(d, cat, u_item)
        return offsets.astype(np.int32), values, n_ev

    # ---- rows --------------------------------------------------------------------------
    def columns(self, d: str, rng: np.random.Generator, rows: int, ts_lo: int, ts_hi: int,
                with_seq: bool = True) -> dict[str, Any]:
        """All columns of ``rows`` impressions of domain ``d`` with ts in ``[ts_lo, ts_hi)``.

        Returns a dict of numpy arrays (``seq`` / ``other_seq`` as (offsets, values)) plus
        ``logit_nobias`` for calibration.
        """
        p, dp, ds, k = self.p, self.p.domain(d), self.dom[d], self.p.knobs
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
                    cat[mask] = np.searchsorted(cdf, u_cat[mask], side="right")
            np.clip(cat, 0, self.C - 1, out=cat)
            harmful = self.is_harmful_category[cat]
        else:
            cat = np.searchsorted(ds["mix_cdf"], u_cat, side="right").clip(0, self.C - 1)
            harmful = None
        iid = self._items_in(d, cat, rng.random(rows))

        z = self.user_latent(d, uid)
        v = self.item_latent(iid, cat)
        inter = np.einsum("ij,ij->i", z, v) * (1.0 / math.sqrt(self.K))
        if harmful is not None:
            inter = inter * np.where(harmful, 1.0 - 2.0 * float(k["harm_strength"]), 1.0)
        quality = hash_factors(iid, self.salt["quality"], 1)[:, 0]
        hour = ((ts - T0) // 3600) % 24
        ua = splitmix64(uid, self.salt["uattr"])
        device = ((ua >> np.uint64(16)) & np.uint64(0xFFFF)).astype(np.int64) % 8
        logit = (float(k["interaction"]) * inter + float(k["quality"]) * quality
                 + 0.3 * np.cos((hour - 20) * (2 * math.pi / 24)) + self.device_effect[device])
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
        zs = hash_factors(uid, self.salt["user"], 2)
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
            off, val, n_ev = self.sequences(d, uid, ts)
            cols["seq"] = (off, val)
            cols["user_level"] = np.minimum(9, np.log2(1 + n_ev).astype(np.int64))
            off_o, val_o, _ = self.sequences(o, uid, ts, present=user_in_other)
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
        names = list(columns) + ["other_seq", "user_in_other", "item_in_other", "label", "ts"]
        if d == "src":
            names.append("is_harmful")
        arrays = []
        for name in names:
            x = cols[name]
            if isinstance(x, tuple):
                arrays.append(pa.ListArray.from_arrays(pa.array(x[0], pa.int32()),
                                                       pa.array(x[1], pa.int64())))
            else:
                arrays.append(pa.array(x))
        return pa.Table.from_arrays(arrays, names=names)


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
