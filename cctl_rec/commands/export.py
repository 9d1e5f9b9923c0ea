"""``cctl-rec export``: the served pure network of a finished run, unsharded, for CPU serving.

Reads the pure network of the run's newest checkpoint: the last checkpoint of a run is written
after its final mixed -> pure sync, so it holds the served network (a checkpoint of a run stopped
earlier has not synced yet: for CCTL its mixed network is read, which that sync would copy). Writes
``model.pt`` (weights only), ``program.pt2`` (``torch.export``) and ``serving.json``
(``cctl_rec/export.py`` lists the files; ``--aoti`` adds the AOTInductor package, the feature
map of a ``cctl-rec prepare`` dataset is copied in). Nothing of
the source side (source tables, SAN, selector, REN) is in it.
"""

from __future__ import annotations

import argparse
import json
import os


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the served (pure) network of a run", description=__doc__)
    p.add_argument("--run-dir", required=True, help="a finished training run directory")
    p.add_argument("--out", required=True, help="directory for the serving artifact")
    p.add_argument("--checkpoint", default="latest",
                   help="'latest' (default), 'best' (the best by valid AUC, run.keep_best) or a step number")
    p.add_argument("--aoti", action="store_true",
                   help="also compile the program with AOTInductor into model.aoti.pt2 for a C++ server "
                        "(docs/serving.md; about a minute on a CPU)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cctl_rec.config import load_config
    from cctl_rec.data.loader import Dataset
    from cctl_rec.export import load_network_from_checkpoint, save_artifact
    from cctl_rec.scoring import pick_checkpoint, served_network
    from cctl_rec.train.checkpoint import check_fingerprint, list_checkpoints, run_fingerprint

    from iopath.common.file_io import g_pathmgr

    from cctl_rec.data.manifest import join

    cfg_path = join(args.run_dir, "config.yaml")
    if not g_pathmgr.exists(cfg_path):
        raise FileNotFoundError(f"{args.run_dir} has no config.yaml; is it a cctl-rec run directory?")
    cfg = load_config(cfg_path)
    ckpts = list_checkpoints(args.run_dir)
    if not ckpts:
        raise FileNotFoundError(f"{args.run_dir} holds no complete checkpoint to export")
    step, ckpt = pick_checkpoint(args.run_dir, args.checkpoint)
    data = Dataset(cfg.data.path)
    trainer = check_fingerprint(ckpt, run_fingerprint(cfg, data))  # config.yaml and the checkpoint must agree
    schema = data.schemas["tgt"]
    # the served network is the pure one after the run's last sync: the final checkpoint holds it; an
    # earlier one (a run stopped before its end) has not synced yet, and its mixed network is what the
    # last sync would copy
    network = "mixed" if cfg.model.name == "cctl" and not trainer.get("final") else "pure"
    if args.checkpoint == "best":  # the network its valid AUC was measured on
        network = served_network(cfg, ckpt)
    model = load_network_from_checkpoint(ckpt, schema, cfg.model.embedding_dim, cfg.model.tower, network,
                                         cfg.model.head)
    meta = save_artifact(model, args.out, {"run": os.path.basename(os.path.normpath(args.run_dir)), "step": step,
                                           "model": cfg.model.name,
                                           "network": "pure (the mixed network, not synced yet)" if network == "mixed"
                                           else "pure"}, cfg.data.max_seq_len, data_root=cfg.data.path,
                         aoti=args.aoti)
    print(json.dumps({"out": args.out, "step": step, "bytes": meta["bytes"], "program": meta["program"],
                      "aoti": meta["aoti"], "features": meta["features"]}))
    return 0
