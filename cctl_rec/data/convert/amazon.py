"""The paper's Amazon setting: Books (source) -> Movies&TV (target), explicit 1-5 star ratings.

Input: two rating files, ``user item rating [timestamp]`` per line, tab/space- or comma-separated,
with or without the header ``user_id item_id rating [timestamp]`` (raw reviewer ids and ASINs),
e.g. the dense subset in ``shared/datasets/amazon-books-movies/`` (TSV with header, no timestamps)
or Amazon's headerless ``ratings_*.csv`` (``user,item,rating,timestamp``). A timestamp column is
checked to be numeric and otherwise ignored.

Rules (recorded in the manifest):

- duplicate (user, item) rows of a file become one row with the **mean** rating;
- label = 1 iff that rating >= ``min_rating`` (4: the paper's "ratings of 4-5 as positive");
- target: seeded per-user hold-out, each user's pairs in a seeded random order, the first
  round(10%) to test, the next round(10%) to valid, the rest to train (a user keeps at least one
  train row; users with fewer than 5 pairs keep all of them in train);
- target sparsity (``sparsity``): the train rows thinned per user, cold-start users; valid/test
  rows untouched; ``user_group`` on valid/test rows (:class:`~cctl_rec.data.convert.common.Sparsity`);
- source: every row is train; ``corruption`` flips labels or replaces items of a seeded share,
  marked ``is_harmful``, after the sequences were drawn;
- sequences: see :mod:`cctl_rec.data.convert.common` (train positives only, never the row's own
  item, never a held-out item).

Example::

    manifest = convert_amazon("data/amazon", seed=0)
    manifest["stats"]["splits"]["tgt/test"]["ctr"]
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import numpy as np

from cctl_rec.data.convert.common import (PRESET_PREFIX, SEQUENCE_RULE, TRAIN, Corruption, Domain, IdSpace, Sparsity,
                                          build_and_write, check_fracs, check_seed, dedupe_mean, input_record,
                                          per_user_split, read_triples, target_sparsity)

logger = logging.getLogger(__name__)

HEADER = ("user_id", "item_id", "rating")
RATING_RANGE = (1.0, 5.0)
DATA_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "..", "..", "shared",
                                         "datasets", "amazon-books-movies"))
"""``<repo>/../shared/datasets/amazon-books-movies`` (the project's shared data folder)."""
DEFAULT_SRC = os.path.join(DATA_DIR, "Amazon-Books-Dense.inter")
DEFAULT_TGT = os.path.join(DATA_DIR, "Amazon-Movies-Dense.inter")


def _read(path: str, what: str):
    t = read_triples(path, HEADER, "rating", what)
    lo, hi = RATING_RANGE
    bad = np.flatnonzero((t.values < lo) | (t.values > hi))
    if bad.size:
        j = int(bad[0])
        raise ValueError(f"{what} file {path} line {int(t.lines[j])}: rating {t.values[j]:g} is outside "
                         f"[{lo:g}, {hi:g}] (Amazon star ratings)")
    return t


def convert_amazon(out: str, src: Optional[str] = None, tgt: Optional[str] = None, seed: int = 0,
                   valid_frac: float = 0.1, test_frac: float = 0.1, min_rating: float = 4.0,
                   max_seq_len: int = 20, shard_rows: int = 1_000_000, sparsity: Optional[Sparsity] = None,
                   corruption: Optional[Corruption] = None) -> dict[str, Any]:
    """Converts the Amazon Books / Movies&TV rating files into a dataset under ``out``.

    Args:
        out: dataset root (created; an earlier conversion there is replaced).
        src: the source (Books) file; default :data:`DEFAULT_SRC`.
        tgt: the target (Movies&TV) file; default :data:`DEFAULT_TGT`.
        seed: seeds the split, the sequences and the row order (same seed, same bytes).
        valid_frac, test_frac: per-user hold-out fractions of the target.
        min_rating: a (mean) rating >= this is a positive.
        max_seq_len: longest ``seq`` / ``other_seq`` written.
        shard_rows: rows per Parquet shard.
        sparsity: target train thinning and cold-start users (default: dense, user groups by
            at most 5 train rows); valid/test rows are the dense conversion's.
        corruption: known harm in the source rows (default: none, no ``is_harmful`` column).

    Returns:
        The manifest written last to ``out/manifest.json``.
    """
    check_seed(seed)
    check_fracs(valid_frac, test_frac)
    sparsity, corruption = sparsity or Sparsity(), corruption or Corruption()
    src, tgt = src or DEFAULT_SRC, tgt or DEFAULT_TGT
    raw = {"src": _read(src, "--src"), "tgt": _read(tgt, "--tgt")}
    pairs = {d: dedupe_mean(t) for d, t in raw.items()}
    ids = IdSpace.build(pairs["src"].users, pairs["tgt"].users, pairs["src"].items, pairs["tgt"].items)
    dom = {}
    for d, p in pairs.items():
        dom[d] = Domain(d, ids.user_ids(p.users), ids.item_ids(d, p.items),
                        (p.values >= min_rating).astype(np.int8), np.full(p.values.size, TRAIN, np.int8))
    dom["tgt"].split = per_user_split(dom["tgt"].user, valid_frac, test_frac, seed, "tgt")
    dom["tgt"].keep, cold, thin = target_sparsity(dom["tgt"], sparsity, seed)
    extra = {"input": {d: {"rows": len(raw[d]), "users": int(np.unique(raw[d].users).size),
                           "items": int(np.unique(raw[d].items).size),
                           "positive_share": round(float((raw[d].values >= min_rating).mean()), 6),
                           "duplicate_rows_removed": pairs[d].duplicates, "pairs": int(pairs[d].values.size),
                           "header": raw[d].header, "timestamp_column": raw[d].timestamps}
                       for d in ("src", "tgt")},
             "target_sparsity": thin,
             "user_groups": {"rule": sparsity.group_rule(), "cold_users": thin["cold_users"],
                             "warm_users": thin["warm_users"]}}
    meta = {
        "preset": PRESET_PREFIX + "amazon",
        "split_rule": (f"target: seeded per-user hold-out, each user's (deduplicated) pairs in a seeded random "
                       f"order, the first round({test_frac:g} * n) to test, the next round({valid_frac:g} * n) "
                       f"to valid, the rest to train (half rounds up, at least one train row per user); "
                       f"source: all rows train. " + SEQUENCE_RULE),
        "params": {"converter": "amazon", "src": input_record(src), "tgt": input_record(tgt),
                   "valid_frac": valid_frac, "test_frac": test_frac, "min_rating": min_rating,
                   "label_rule": f"label = 1 iff rating >= {min_rating:g}",
                   "dedupe_rule": "one row per (user, item): the mean rating of its duplicates",
                   "timestamp_rule": "a 4th (timestamp) column is checked to be numeric and ignored",
                   "target_sparsity": sparsity.to_json(),
                   "corruption": {"frac": corruption.frac, "mode": corruption.mode,
                                  "rule": corruption.rule() if corruption.frac > 0 else "none"},
                   "shard_rows": shard_rows},
    }
    logger.info("amazon: %d source pairs, %d target pairs, %d users", len(dom["src"]), len(dom["tgt"]), ids.n_users)
    return build_and_write(out, dom["src"], dom["tgt"], ids, seed, max_seq_len, shard_rows, meta, extra, cold,
                           corruption)
