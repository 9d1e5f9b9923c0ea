"""``cctl-rec convert``: public interaction files -> a cctl-rec dataset (Parquet shards + manifest.json).

Rules (dedupe, labels, split, sequences, negatives) in ``docs/data.md``; each dataset's
``manifest.json`` records them with the input files' sha256 and the measured statistics. Same
inputs and seed: byte-identical output. The manifest is written last: a directory without one is
not a finished dataset.

Example::

    cctl-rec convert amazon --out data/amazon
    cctl-rec convert implicit --src-dir ../shared/datasets/disencdr-amazon/sport_phone \\
        --tgt-dir ../shared/datasets/disencdr-amazon/phone_sport --out data/phone-sport --neg-per-pos 4
    cctl-rec convert amazon --out data/amazon-s20 --tgt-keep-frac 0.2          # sparse target
    cctl-rec convert amazon --out data/amazon-cold --cold-user-frac 0.3 --cold-k 3
    cctl-rec convert amazon --out data/amazon-harm --corrupt-frac 0.3 --corrupt-mode label

Target valid/test rows carry ``user_group`` (0 warm, 1 cold) for the cold/warm AUC in metrics.json.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    from cctl_rec.data.convert.amazon import DEFAULT_SRC, DEFAULT_TGT

    p = sub.add_parser("convert", help="convert public interaction data into a cctl-rec dataset",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    conv = p.add_subparsers(dest="source", metavar="SOURCE", required=True)

    a = conv.add_parser("amazon", help="Amazon Books (source) -> Movies&TV (target) ratings",
                        description="Amazon rating files, one 'user item rating [timestamp]' line per rating "
                                    "(1-5 stars), tab/space- or comma-separated, with or without the header "
                                    "'user_id item_id rating [timestamp]' (so Amazon's headerless "
                                    "ratings_*.csv 'user,item,rating,timestamp' is read as it is; the "
                                    "timestamp is checked to be a number and ignored): duplicates averaged, "
                                    "rating >= 4 positive, seeded per-user train/valid/test split of the "
                                    "target, source all train. Details: docs/data.md.")
    a.add_argument("--src", default=DEFAULT_SRC, help=f"source (Books) file (default: {DEFAULT_SRC})")
    a.add_argument("--tgt", default=DEFAULT_TGT, help=f"target (Movies&TV) file (default: {DEFAULT_TGT})")
    a.add_argument("--valid-frac", type=float, default=0.1, help="per-user target share in valid (default 0.1)")
    a.add_argument("--test-frac", type=float, default=0.1, help="per-user target share in test (default 0.1)")
    a.add_argument("--min-rating", type=float, default=4.0, help="positive iff rating >= this (default 4)")
    _common(a)
    a.set_defaults(func=run)

    i = conv.add_parser("implicit", help="'user item value' folders with train.txt / test.txt (e.g. DisenCDR)",
                        description="Folders of 'user item value [timestamp]' files without header, "
                                    "whitespace- or comma-separated (train.txt, test.txt; user ids shared by "
                                    "the two folders; a timestamp column is checked to be a number and "
                                    "ignored). The target's test.txt is the test split, valid is carved from "
                                    "its train.txt; negatives are sampled per user from the items it has no "
                                    "row with. Details: docs/data.md.")
    i.add_argument("--src-dir", required=True, help="source domain folder (train.txt, optional test.txt)")
    i.add_argument("--tgt-dir", required=True, help="target domain folder (train.txt and test.txt)")
    i.add_argument("--neg-per-pos", type=int, default=4,
                   help="negatives sampled per positive, uniformly from the items the user has no row with "
                        "(default 4). 0: none, the labels come from the values alone: for rating files with "
                        "--min-positive (e.g. 4); refused when a target split would hold one label class, "
                        "as with implicit 'user item 1' files")
    i.add_argument("--valid-frac", type=float, default=0.1,
                   help="per-user share of the target train rows moved to valid (default 0.1)")
    i.add_argument("--min-positive", type=float, default=1.0,
                   help="positive iff value >= this (default 1: every implicit 'user item 1' line)")
    _common(i)
    i.set_defaults(func=run)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output dataset directory (local path or iopath URI)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds split, sequences, negatives, thinning, cold users, corruption, row order (default 0)")
    p.add_argument("--max-seq-len", type=int, default=20, help="longest seq / other_seq written (default 20)")
    p.add_argument("--shard-rows", type=int, default=1_000_000, help="rows per Parquet shard (default 1000000)")
    g = p.add_argument_group("target sparsity (valid/test rows stay the dense conversion's)")
    g.add_argument("--tgt-keep-frac", type=float, default=1.0, metavar="F",
                   help="keep a seeded share F of each target user's train rows, at least one (default 1.0: "
                        "all); sequences come from the kept train positives only")
    g.add_argument("--cold-user-frac", type=float, default=0.0, metavar="F",
                   help="a seeded share F of the target users keep only --cold-k train rows (default 0: none)")
    g.add_argument("--cold-k", type=int, default=5, metavar="K",
                   help="train rows a cold-start user keeps; without --cold-user-frac, the user_group rule: "
                        "cold = at most K target train rows after thinning (default 5)")
    h = p.add_argument_group("known harm in the source (column is_harmful)")
    h.add_argument("--corrupt-frac", type=float, default=0.0, metavar="F",
                   help="corrupt a seeded share F of the source rows after the sequences are drawn from the "
                        "clean rows, and mark every source row's is_harmful (default 0: none, no column)")
    h.add_argument("--corrupt-mode", choices=("label", "item"), default="label",
                   help="label: the label flipped; item: the item replaced by a uniformly random other source "
                        "item (default label)")


def run(args: argparse.Namespace) -> int:
    from cctl_rec.data.convert.common import Corruption, Sparsity

    common: dict[str, Any] = {"seed": args.seed, "max_seq_len": args.max_seq_len, "shard_rows": args.shard_rows,
                              "sparsity": Sparsity(args.tgt_keep_frac, args.cold_user_frac, args.cold_k),
                              "corruption": Corruption(args.corrupt_frac, args.corrupt_mode)}
    if args.source == "amazon":
        from cctl_rec.data.convert.amazon import convert_amazon

        m = convert_amazon(args.out, src=args.src, tgt=args.tgt, valid_frac=args.valid_frac,
                           test_frac=args.test_frac, min_rating=args.min_rating, **common)
    else:
        from cctl_rec.data.convert.implicit import convert_implicit

        m = convert_implicit(args.out, src_dir=args.src_dir, tgt_dir=args.tgt_dir, neg_per_pos=args.neg_per_pos,
                             valid_frac=args.valid_frac, min_positive=args.min_positive, **common)
    st = m["stats"]
    rows = ", ".join(f"{k} {v}" for k, v in st["rows"].items())
    ctr = ", ".join(f"{k} {v['ctr']:.4f}" for k, v in st["splits"].items())
    g = st.get("user_groups", {})
    harm = st.get("corruption")
    print(f"wrote {args.out}: {rows} rows; ctr {ctr}; users src {st['users']['src']} tgt {st['users']['tgt']} "
          f"both {st['users']['both']}; items src {st['items']['src']} tgt {st['items']['tgt']}; "
          f"cold users {g.get('cold_users', 0)}"
          + (f"; {harm['rows']} source rows corrupted ({harm['mode']})" if harm else ""))
    return 0
