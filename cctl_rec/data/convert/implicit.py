"""Generic ``user item value`` files with their own train/test split, e.g. DisenCDR's Amazon pairs.

Input: a source folder and a target folder, each with ``train.txt`` and ``test.txt`` (whitespace
-separated ``user item value`` lines, no header; ``value`` is 1 for implicit feedback or a
rating). User ids are shared between the two folders; item ids are per domain.

Rules (recorded in the manifest):

- duplicate (user, item) lines of a file become one row with the mean value; label = 1 iff that
  value >= ``min_positive`` (1: every line of an implicit ``user item 1`` file is a positive;
  rows below it are kept as observed negatives);
- target: ``test.txt`` is the test split; a pair in both files stays in test only (dropped from
  train); valid is carved from ``train.txt``, seeded per user (each user's train rows in a seeded
  order, the first round(``valid_frac`` * n) to valid, at least one left in train);
- source: ``train.txt`` and, if present, ``test.txt`` are all source train rows (the source is
  never evaluated);
- negatives: for every user of a domain, ``neg_per_pos`` x (its positives, all splits) items are
  drawn uniformly without replacement from the domain's items (every item in its files) the user
  has no row with, seeded per user; the j-th drawn negative goes with the user's
  (j // neg_per_pos)-th positive (users' positives sorted by item id) and takes its split. No
  (user, item) pair appears twice, so a sampled negative is never a positive of the user, nor a
  train negative a test negative. A user with fewer such items gets all of them (counted in the
  manifest as ``negatives.short_users``);
- target sparsity (``sparsity``): the observed target train rows thinned per user, cold-start
  users; a sampled negative is kept iff its positive is (negatives are sampled on the dense rows,
  so valid/test rows are the dense conversion's); ``user_group`` on valid/test rows;
- corruption (``corruption``): labels flipped or items replaced on a seeded share of the source
  rows, marked ``is_harmful``, after the sequences were drawn;
- a 4th (timestamp) column is checked to be numeric and ignored;
- sequences: see :mod:`cctl_rec.data.convert.common` (train positives only).

Example::

    convert_implicit("data/phone-sport", src_dir=".../sport_phone", tgt_dir=".../phone_sport")
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import numpy as np
from iopath.common.file_io import g_pathmgr

from cctl_rec.data.convert.common import (DOMAIN_CODE, NEG_PURPOSE, PRESET_PREFIX, SEQUENCE_RULE, TEST, TRAIN,
                                          VALID, Corruption, Domain, IdSpace, Pairs, Sparsity, Triples,
                                          build_and_write, check_fracs, check_seed, dedupe_mean, input_record,
                                          per_user_split, read_triples, rng_for, target_sparsity, user_groups)
from cctl_rec.data.manifest import join

logger = logging.getLogger(__name__)

TRAIN_FILE, TEST_FILE = "train.txt", "test.txt"


def _files(folder: str, what: str, need_test: bool) -> list[str]:
    if not g_pathmgr.exists(folder):
        raise FileNotFoundError(f"{what} {folder} does not exist")
    if not g_pathmgr.isdir(folder):
        raise NotADirectoryError(f"{what} {folder} is not a directory; expected a folder with "
                                 f"{TRAIN_FILE} and {TEST_FILE}")
    out = [join(folder, TRAIN_FILE)]
    test = join(folder, TEST_FILE)
    if need_test or g_pathmgr.exists(test):
        out.append(test)
    for p in out:
        if not g_pathmgr.exists(p):
            raise FileNotFoundError(f"{what} {folder} has no {p.rsplit('/', 1)[-1]} "
                                    f"(expected 'user item value' lines)")
    return out


def _concat(ts: list[Triples]) -> Triples:
    return Triples(ts[0].path, np.concatenate([t.users for t in ts]), np.concatenate([t.items for t in ts]),
                   np.concatenate([t.values for t in ts]), np.concatenate([t.lines for t in ts]))


def _pair_keys(p: Pairs) -> np.ndarray:
    return np.char.add(np.char.add(p.users, "\t"), p.items)


def sample_negatives(d: Domain, item_range: tuple[int, int], neg_per_pos: int, seed: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
    """(user, item, split) of the sampled negatives of ``d``, the number of users that had
    fewer candidate items than ``neg_per_pos`` x positives (rule: module docstring), and each
    negative's anchor: the index of the row of ``d`` (its positive) it goes with."""
    lo, hi = item_range
    n_items = hi - lo
    users, items, splits, anchors, short = [], [], [], [], 0
    for g in user_groups(d.user):
        pos = g[d.label[g] == 1]
        need = neg_per_pos * pos.size
        if need == 0:
            continue
        u = int(d.user[g[0]])
        seen = d.item[g] - lo
        avail = n_items - np.unique(seen).size
        take = min(need, avail)
        short += take < need
        if take == 0:
            continue
        rng = rng_for(seed, NEG_PURPOSE, DOMAIN_CODE[d.name], u)
        if 2 * take <= avail:  # rejection sampling, first occurrences in draw order
            chosen = np.empty(0, dtype=np.int64)
            while chosen.size < take:
                cand = rng.integers(0, n_items, size=2 * (take - chosen.size) + 8)
                both = np.concatenate([chosen, cand[~np.isin(cand, seen)]])
                _, first = np.unique(both, return_index=True)
                chosen = both[np.sort(first)][:take]
        else:
            chosen = rng.permutation(np.setdiff1d(np.arange(n_items), seen))[:take]
        users.append(np.full(take, u, dtype=np.int64))
        items.append(chosen + lo)
        anchor = pos[np.arange(take) // neg_per_pos]
        splits.append(d.split[anchor])
        anchors.append(anchor)
    if not users:
        return np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int8), short, np.empty(0, np.int64)
    return (np.concatenate(users), np.concatenate(items), np.concatenate(splits), short,
            np.concatenate(anchors).astype(np.int64))


def _check_both_labels(t: Domain, min_positive: float) -> None:
    """--neg-per-pos 0: every target split needs both label classes from the values alone."""
    for code, name in ((TRAIN, "train"), (VALID, "valid"), (TEST, "test")):
        y = t.label[t.split == code]
        if y.size and y.min() == y.max():
            only = "positives" if y[0] == 1 else "negatives"
            raise ValueError(f"--neg-per-pos 0 samples no negatives, and every target {name} row is one of the "
                             f"{only} (value {'>=' if y[0] == 1 else '<'} --min-positive {min_positive:g}): AUC "
                             f"needs both labels; use --neg-per-pos N >= 1 for implicit 'user item 1' files, or "
                             f"--neg-per-pos 0 only with rating files and a --min-positive some values fall below")


def convert_implicit(out: str, src_dir: str, tgt_dir: str, neg_per_pos: int = 4, seed: int = 0,
                     valid_frac: float = 0.1, min_positive: float = 1.0, max_seq_len: int = 20,
                     shard_rows: int = 1_000_000, sparsity: Optional[Sparsity] = None,
                     corruption: Optional[Corruption] = None) -> dict[str, Any]:
    """Converts a source and a target folder of ``user item value`` files into a dataset.

    Args:
        out: dataset root (created; an earlier conversion there is replaced).
        src_dir: source domain folder (``train.txt``, optional ``test.txt``).
        tgt_dir: target domain folder (``train.txt`` and ``test.txt``).
        neg_per_pos: sampled negatives per positive (0: none; every label then comes from the
            values, for rating files with ``min_positive``; refused when a target split would
            hold one label class, e.g. an implicit ``user item 1`` file).
        seed: seeds the valid split, the negatives, the sequences and the row order.
        valid_frac: per-user share of the target train rows moved to valid.
        min_positive: a (mean) value >= this is a positive.
        max_seq_len: longest ``seq`` / ``other_seq`` written.
        shard_rows: rows per Parquet shard.
        sparsity: target train thinning and cold-start users, by observed train row (its
            sampled negatives follow it); negatives are sampled on the dense data, so valid/test
            rows are the dense conversion's.
        corruption: known harm in the source rows (default: none, no ``is_harmful`` column).

    Returns:
        The manifest written last to ``out/manifest.json``.
    """
    check_seed(seed)
    check_fracs(valid_frac, 0.0)
    sparsity, corruption = sparsity or Sparsity(), corruption or Corruption()
    if not isinstance(neg_per_pos, int) or neg_per_pos < 0:
        raise ValueError(f"--neg-per-pos must be an integer >= 0, got {neg_per_pos!r}")
    src_files = _files(src_dir, "--src-dir", need_test=False)
    tgt_files = _files(tgt_dir, "--tgt-dir", need_test=True)
    src_raw = [read_triples(p, None, "value", f"source {p.rsplit('/', 1)[-1]}") for p in src_files]
    tgt_raw = [read_triples(p, None, "value", f"target {p.rsplit('/', 1)[-1]}") for p in tgt_files]
    src_pairs = dedupe_mean(_concat(src_raw))
    tgt_train, tgt_test = dedupe_mean(tgt_raw[0]), dedupe_mean(tgt_raw[1])
    in_test = np.isin(_pair_keys(tgt_train), _pair_keys(tgt_test))
    tgt_train = Pairs(tgt_train.users[~in_test], tgt_train.items[~in_test], tgt_train.values[~in_test],
                      tgt_train.duplicates)
    ids = IdSpace.build(src_pairs.users, np.concatenate([tgt_train.users, tgt_test.users]), src_pairs.items,
                        np.concatenate([tgt_train.items, tgt_test.items]))

    def domain(name: str, parts: list[tuple[Pairs, int]]) -> Domain:
        return Domain(name, np.concatenate([ids.user_ids(p.users) for p, _ in parts]),
                      np.concatenate([ids.item_ids(name, p.items) for p, _ in parts]),
                      np.concatenate([(p.values >= min_positive).astype(np.int8) for p, _ in parts]),
                      np.concatenate([np.full(p.values.size, s, np.int8) for p, s in parts]))

    dom = {"src": domain("src", [(src_pairs, TRAIN)]), "tgt": domain("tgt", [(tgt_train, TRAIN), (tgt_test, TEST)])}
    t = dom["tgt"]
    tr = np.flatnonzero(t.split == TRAIN)
    t.split[tr[per_user_split(t.user[tr], valid_frac, 0.0, seed, "tgt") == VALID]] = VALID
    if neg_per_pos == 0:
        _check_both_labels(t, min_positive)
    negatives = {}
    keep, cold, thin = target_sparsity(t, sparsity, seed)  # on the observed rows; negatives follow
    for name, d in list(dom.items()):
        # sampled on the dense rows, so the valid/test negatives do not depend on the thinning
        nu, ni, ns, short, anchor = sample_negatives(d, ids.item_range(name), neg_per_pos, seed)
        negatives[name] = {"sampled": int(nu.size), "short_users": short}
        k_obs, k_neg = (keep, keep[anchor]) if name == "tgt" else (np.ones(len(d), bool), np.ones(nu.size, bool))
        dom[name] = Domain(name, np.concatenate([d.user, nu]), np.concatenate([d.item, ni]),
                           np.concatenate([d.label, np.zeros(nu.size, np.int8)]), np.concatenate([d.split, ns]),
                           np.concatenate([d.sampled, np.ones(nu.size, bool)]), np.concatenate([k_obs, k_neg]))
        if name == "tgt":
            thin["sampled_negatives_kept"] = int(k_neg.sum())
    extra = {
        "input": {
            "src": {"rows": sum(len(x) for x in src_raw), "pairs": int(src_pairs.values.size),
                    "duplicate_rows_removed": src_pairs.duplicates,
                    "positive_share": round(float((src_pairs.values >= min_positive).mean()), 6)},
            "tgt": {"train_rows": len(tgt_raw[0]), "test_rows": len(tgt_raw[1]),
                    "duplicate_rows_removed": tgt_train.duplicates + tgt_test.duplicates,
                    "train_pairs_dropped_in_test": int(in_test.sum()),
                    "positive_share": round(float(t.label.mean()), 6)},
        },
        "negatives": negatives,
        "target_sparsity": thin,
        "user_groups": {"rule": sparsity.group_rule(), "cold_users": thin["cold_users"],
                        "warm_users": thin["warm_users"]},
    }
    for d, raws in (("src", src_raw), ("tgt", tgt_raw)):
        extra["input"][d]["timestamp_column"] = any(r.timestamps for r in raws)
    meta = {
        "preset": PRESET_PREFIX + "implicit",
        "split_rule": (f"target: {TEST_FILE} is test (a pair also in {TRAIN_FILE} stays in test only); valid "
                       f"carved from {TRAIN_FILE} per user, seeded: each user's train rows in a seeded order, "
                       f"the first round({valid_frac:g} * n) to valid (at least one train row kept); source: "
                       f"every row of its files is train. Negatives: {neg_per_pos} per positive, uniform without "
                       f"replacement per user over the domain's items the user has no row with, seeded; each "
                       f"takes its positive's split. " + SEQUENCE_RULE),
        "params": {"converter": "implicit", "src": [input_record(p) for p in src_files],
                   "tgt": [input_record(p) for p in tgt_files], "neg_per_pos": neg_per_pos,
                   "valid_frac": valid_frac, "min_positive": min_positive,
                   "label_rule": f"label = 1 iff value >= {min_positive:g}; sampled negatives 0",
                   "dedupe_rule": "one row per (user, item) and file: the mean value of its duplicates",
                   "timestamp_rule": "a 4th (timestamp) column is checked to be numeric and ignored",
                   "target_sparsity": sparsity.to_json(),
                   "corruption": {"frac": corruption.frac, "mode": corruption.mode,
                                  "rule": corruption.rule() if corruption.frac > 0 else "none"},
                   "shard_rows": shard_rows},
    }
    logger.info("implicit: %d source rows, %d target rows (%d + %d sampled negatives), %d users",
                len(dom["src"]), len(dom["tgt"]), negatives["src"]["sampled"], negatives["tgt"]["sampled"],
                ids.n_users)
    return build_and_write(out, dom["src"], dom["tgt"], ids, seed, max_seq_len, shard_rows, meta, extra, cold,
                           corruption)
