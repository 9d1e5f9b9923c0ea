"""``generate``: a whole dataset directory — shards in parallel, resumable, manifest last.

Work split: the global shard plan is cut by ``RANK`` / ``WORLD_SIZE`` (shard ``i`` goes to rank
``i % WORLD_SIZE``), then over ``workers`` local processes. Every shard is seeded from
(seed, domain, split, shard index), so the bytes do not depend on either number. Rank 0 waits
until every shard is complete, then writes ``manifest.json``.

Example::

    manifest = generate("data/tiny", preset="tiny", workers=2)
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from iopath.common.file_io import g_pathmgr

from cctl_rec.data.manifest import FORMAT, atomic_write_bytes, join, write_manifest
from cctl_rec.datagen.generator import Generator, calibrate, schemas_of
from cctl_rec.datagen.presets import LEGACY_KNOBS, GenParams, resolve
from cctl_rec.datagen.stats import merge_stats
from cctl_rec.datagen.writer import (SPLIT_KEYS, ShardTask, clean_temps, is_complete, plan, split_rule,
                                     write_shard)

logger = logging.getLogger(__name__)

PARAMS_FILE = "datagen-params.json"
_WORKER: dict[str, Any] = {}


def _init_worker(root: str, params_json: dict[str, Any]) -> None:
    params = GenParams.from_json(params_json)
    schemas = schemas_of(params)
    _WORKER.update(root=root, gen=Generator(params), params=params,
                   columns={d: s.columns for d, s in schemas.items()})


def _run_task(task: ShardTask) -> dict[str, Any]:
    w = _WORKER
    return write_shard(w["root"], w["gen"], task, w["columns"][task.domain],
                       int(w["params"].knobs["row_group_rows"]))


@contextmanager
def light_children() -> Iterator[None]:
    """Spawned workers skip cctl_rec's torch/fbgemm import check (they never touch torch).

    Hold it while the pool starts processes (on its first submit, not at construction): a
    worker that imports the torch stack costs ~0.3 GiB more RSS.
    """
    old = os.environ.get("CCTL_REC_SKIP_STACK_CHECK")
    os.environ["CCTL_REC_SKIP_STACK_CHECK"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CCTL_REC_SKIP_STACK_CHECK", None)
        else:
            os.environ["CCTL_REC_SKIP_STACK_CHECK"] = old


def check_output(out: str) -> None:
    """Creates ``out`` and proves it writable, or raises ValueError naming it."""
    try:
        g_pathmgr.mkdirs(out)
        probe = join(out, f".datagen-probe-{os.getpid()}")
        atomic_write_bytes(probe, b"ok")
        g_pathmgr.rm(probe)
    except (OSError, ValueError) as e:
        raise ValueError(f"output {out!r} is not writable: "
                         f"{getattr(e, 'strerror', None) or e}") from None


def _flat(d: dict) -> dict:
    """{"knobs": {"a": 1}, "seed": 0} -> {"knobs.a": 1, "seed": 0}, so a refusal names the knob."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


def _guard_params(out: str, params: GenParams) -> None:
    """Refuses to resume into a directory generated with other parameters."""
    path = join(out, PARAMS_FILE)
    mine = params.to_json()
    if g_pathmgr.exists(path):
        with g_pathmgr.open(path, "r") as f:
            try:
                theirs = json.load(f)
            except json.JSONDecodeError:
                theirs = None
        if isinstance(theirs, dict) and isinstance(theirs.get("knobs"), dict):
            # a knob added later: data written before it existed had its neutral value
            theirs["knobs"] = {**LEGACY_KNOBS, **theirs["knobs"]}
        if theirs is not None and theirs != mine:
            flat_mine, flat_theirs = _flat(mine), _flat(theirs)
            diff = sorted(k for k in set(flat_mine) | set(flat_theirs) if flat_mine.get(k) != flat_theirs.get(k))
            raise ValueError(f"output {out!r} holds data generated with other parameters "
                             f"(differs in {', '.join(diff)}); use a new --out or empty it")
        if theirs == mine:
            return
    atomic_write_bytes(path, (json.dumps(mine, indent=1) + "\n").encode())


def env_rank() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment; (0, 1) when unset."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise ValueError(f"RANK / WORLD_SIZE must be integers, got RANK={os.environ.get('RANK')!r} "
                         f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}") from None
    if world <= 1:
        return 0, 1
    if not 0 <= rank < world:
        raise ValueError(f"RANK must be in [0, {world}), got {rank}")
    return rank, world


def generate(out: str, preset: str = "tiny", scale: float = 1.0, scale_ids: bool = False,
             seed: int = 0, workers: int = 1, max_shards: Optional[int] = None,
             rank: Optional[int] = None, world_size: Optional[int] = None,
             progress: bool = True, wait_timeout_s: float = 6 * 3600.0,
             poll_s: float = 2.0, knobs: Optional[dict[str, float]] = None) -> Optional[dict[str, Any]]:
    """Generates (or completes) a dataset under ``out``.

    Args:
        out: output directory, local path or iopath URI.
        preset: ``tiny``, ``small`` or ``meituan``.
        scale: multiplies sample counts.
        scale_ids: also scale user / item id spaces.
        seed: dataset seed.
        workers: local processes (>= 1).
        max_shards: at most this many shards per split (partial trial runs).
        rank / world_size: this replica's share of the shards (default: env RANK/WORLD_SIZE).
        progress: show a tqdm bar on rank 0.
        wait_timeout_s: how long rank 0 waits for other ranks' shards.
        poll_s: rank 0's polling interval.
        knobs: overrides of the preset's generator knobs (``datagen.presets.KNOBS``).

    Returns:
        The manifest on rank 0, None on the other ranks.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"max_shards must be >= 1, got {max_shards}")
    if rank is None or world_size is None:
        rank, world_size = env_rank()
    params = calibrate(resolve(preset, scale, scale_ids, seed, knobs))
    check_output(out)
    _guard_params(out, params)
    tasks = plan(params, max_shards)
    mine = [t for t in tasks if t.index % world_size == rank]
    for key in SPLIT_KEYS:
        g_pathmgr.mkdirs(join(out, *key.split("/")))
    clean_temps(out, mine)
    logger.info("datagen %s x%g into %s: %d shards (%d on rank %d), %d workers", preset, scale,
                out, len(tasks), len(mine), rank, workers)
    results = _run(out, params, mine, workers, progress and rank == 0)
    if rank != 0:
        return None
    if world_size > 1:
        results.update(_wait_for_others(out, [t for t in tasks if t.index not in results],
                                        wait_timeout_s, poll_s))
    manifest = build_manifest(params, tasks, results, max_shards)
    write_manifest(out, manifest)
    return manifest


def _run(out: str, params: GenParams, tasks: list[ShardTask], workers: int,
         progress: bool) -> dict[int, dict[str, Any]]:
    results: dict[int, dict[str, Any]] = {}
    from cctl_rec.logging_utils import progress as bar_on_stderr

    bar = bar_on_stderr(total=sum(t.rows for t in tasks), unit="rows", unit_scale=True, mininterval=5,
                        disable=not progress, desc="datagen")
    skipped = 0
    try:
        if workers == 1 or len(tasks) <= 1:
            _init_worker(out, params.to_json())
            it = map(_run_task, tasks)
            for t, r in zip(tasks, it):
                results[t.index] = r
                skipped += r["skipped"]
                bar.update(t.rows)
        else:
            # spawn (not fork): the parent may hold torch threads; a worker that dies raises
            # BrokenProcessPool here instead of being silently respawned. The pool starts its
            # processes on the first submit, so the light environment must outlive that.
            pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=mp.get_context("spawn"),
                                       initializer=_init_worker, initargs=(out, params.to_json()))
            with light_children(), pool:
                futures = {pool.submit(_run_task, t): t for t in tasks}
                for fut in as_completed(futures):
                    t, r = futures[fut], fut.result()
                    results[t.index] = r
                    skipped += r["skipped"]
                    bar.update(t.rows)
    finally:
        bar.close()
        _WORKER.clear()
    if skipped:
        logger.info("%d of %d shards were already complete and verified", skipped, len(tasks))
    return results


def _wait_for_others(out: str, tasks: list[ShardTask], timeout_s: float,
                     poll_s: float) -> dict[int, dict[str, Any]]:
    """Rank 0: polls until the other ranks' shards are complete; returns their stats."""
    deadline = time.monotonic() + timeout_s
    pending = {t.index: t for t in tasks}
    got: dict[int, dict[str, Any]] = {}
    logger.info("waiting for %d shards from the other ranks", len(pending))
    while pending:
        for i, t in list(pending.items()):
            stats = is_complete(out, t, verify=False)
            if stats is not None:
                got[i] = stats
                del pending[i]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} shards (e.g. {next(iter(pending.values())).relpath}) "
                               f"were not written by the other ranks within {timeout_s:.0f} s")
        time.sleep(poll_s)
    return got


def build_manifest(params: GenParams, tasks: list[ShardTask], results: dict[int, dict[str, Any]],
                   max_shards: Optional[int]) -> dict[str, Any]:
    """The ``manifest.json`` dict (format cctl-rec/v1) from the shards' stats."""
    import cctl_rec

    splits: dict[str, list[dict[str, Any]]] = {k: [] for k in SPLIT_KEYS}
    grouped: dict[str, list[dict[str, Any]]] = {k: [] for k in SPLIT_KEYS}
    for t in tasks:
        r = results[t.index]
        splits[t.key].append({"path": t.relpath, "rows": r["rows"], "sha256": r["sha256"],
                              "bytes": r["bytes"]})
        grouped[t.key].append(r)
    schemas = schemas_of(params)
    harmful = Generator(params).harmful_categories.tolist()
    return {
        "format": FORMAT,
        "schema": {d: schemas[d].to_json() for d in ("src", "tgt")},
        "splits": splits,
        "split_rule": split_rule(params),
        "max_seq_len": int(params.knobs["max_seq_len"]),
        "preset": params.preset,
        "params": {**params.to_json(), "max_shards": max_shards},
        "seed": params.seed,
        "version": cctl_rec.__version__,
        "stats": merge_stats(grouped, params, harmful),
    }
