"""``cctl-rec experiment``: models x datasets x seeds from ``configs/experiments/<name>.yaml``.

Writes ``OUT/results.json``, ``OUT/report.md`` (Table 2-style tables, mean ± std over seeds, the
paper's numbers beside ours) and PNG plots; every run's directory is under ``OUT/runs/``. Rerunning
the same command skips the runs that finished. ``--out`` may be a URL (``s3://bucket/exp``): the
runs' directories, their logs and the report are then objects below it (docs/storage.md).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import time

logger = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experiment", help="models x seeds -> results.json + report.md + plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example: cctl-rec experiment --config configs/experiments/amazon.yaml "
                              "--out runs/exp-amazon")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("--out", required=True, help="output directory, or a URL (s3://bucket/prefix)")
    p.add_argument("--seeds", default=None, help="override the seeds, e.g. 0,1")
    p.add_argument("--only", default=None, help="comma-separated model names to run (the report covers all)")
    p.add_argument("--jobs", type=int, default=1,
                   help="1-rank runs in parallel, one worker process per core (default 1); each worker imports "
                        "torch once and trains its runs one after another")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the runs that finished under --out; train nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from iopath.common.file_io import g_pathmgr

    from cctl_rec import storage
    from cctl_rec.data.manifest import join
    from cctl_rec.experiment.report import write_report
    from cctl_rec.experiment.runner import plan_runs, run_all
    from cctl_rec.experiment.spec import load_spec

    if args.jobs < 1:
        raise ValueError(f"--jobs {args.jobs}: expected an integer >= 1")
    spec = load_spec(args.config)
    if args.seeds:
        try:
            seeds = tuple(int(s) for s in args.seeds.split(","))
        except ValueError:
            raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers such as 0,1,2") from None
        spec = dataclasses.replace(spec, seeds=seeds)
    if args.only:
        keep = [s.strip() for s in args.only.split(",")]
        unknown = [k for k in keep if k not in [m.name for m in spec.models]]
        if unknown:
            raise ValueError(f"--only {unknown}: not models of {args.config} ({[m.name for m in spec.models]})")
        spec = dataclasses.replace(spec, models=tuple(m for m in spec.models if m.name in keep),
                                   alpha_sweep=spec.alpha_sweep if spec.alpha_sweep and spec.alpha_sweep[0] in keep
                                   else None,
                                   ablation=tuple(a for a in spec.ablation if a in keep))
    if storage.is_remote(args.out):  # a prefix: nothing to make (check_paths checked the bucket)
        if g_pathmgr.isfile(args.out):
            raise NotADirectoryError(f"--out {args.out} is an object, not a prefix; expected a prefix to write below")
    else:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise NotADirectoryError(f"--out {args.out} exists and is not a directory")
        os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    if args.report_only:
        from cctl_rec.experiment.runner import finished

        records = finished(spec, args.out)
        planned = len(plan_runs(spec))
        logger.info("report of %d finished run(s) of %d planned", len(records), planned)
    else:
        records = run_all(spec, args.out, jobs=args.jobs)
    command = shlex.join(["cctl-rec", "experiment", "--config", args.config, "--out", args.out]
                         + (["--seeds", args.seeds] if args.seeds else []) + (["--only", args.only] if args.only else [])
                         + (["--jobs", str(args.jobs)] if args.jobs != 1 else [])
                         + (["--report-only"] if args.report_only else []))
    write_report(spec, records, args.out, command, time.perf_counter() - t0)
    failed = [r for r in records if r["status"] != "ok"]
    with g_pathmgr.open(join(args.out, "report.md")) as f:
        print(f.read())
    if failed:
        print(f"{len(failed)} run(s) failed; see their train.log: " +
              ", ".join(r["run_dir"] for r in failed[:5]), file=sys.stderr)
        return 1
    return 0
