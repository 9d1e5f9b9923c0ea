"""``cctl-rec train --features F --data RAW``: training on raw logs, the mapping cached in the run.

The mapping is :func:`cctl_rec.data.features.prepare.prepare` (vectorised, ``pyarrow.compute``),
run once per run directory into ``RUN/prepared/<key>/``; training then reads that dataset exactly
as it reads one ``cctl-rec prepare`` wrote (same bytes, so the same batches and the same metrics).

- **key**: the sha256 (16 hex digits) of the feature config's bytes, the raw data root, and each
  raw file's path, size and modification time (the vocabularies a space reuses, ``vocab.path``,
  included): a rerun, a resumed run or a restarted rank on the same inputs finds its mapping; a
  changed config or changed data is another key, mapped again, never the old mapping reused.
- **complete**: ``RUN/prepared/<key>/source.json`` (what the key was made of, who mapped it, how
  long it took) exists. On a local run directory rank 0 maps into ``prepared/.tmp-<key>-<pid>@<host>``
  and renames the finished directory to ``<key>`` (atomic), holding the run directory's lock while
  it maps (a second ``train`` on the run directory is refused at once); on a URL (``s3://``, where
  a prefix cannot be renamed) it writes below ``<key>/`` with the manifest after the shards and
  ``source.json`` last, so an interrupted mapping is never taken for a finished one.
- **other ranks** wait for ``source.json`` (polling every half second) and fail with one line
  after ``timeout`` seconds, naming the directory they waited for.
- **another key already there**: with a checkpoint in the run directory the run was trained on that
  mapping, so the changed config or data is refused (one line naming what changed: a run
  directory holds one run); without one the old mapping is removed once the new one is complete.

Example::

    path = ensure_prepared("my_features.yaml", "my_logs", "runs/mine", rank=0)  # runs/mine/prepared/<key>
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from typing import Any, Iterator, Optional

from iopath.common.file_io import g_pathmgr

from cctl_rec import storage
from cctl_rec.data.manifest import atomic_write_bytes, join, sha256_file

logger = logging.getLogger(__name__)

PREPARED = "prepared"
"""The run directory's folder of mappings (one per key)."""
SOURCE_JSON = "source.json"
"""Written last into ``prepared/<key>/``: the mapping is complete."""
POLL_S = 0.5


def cache_source(features: str, data: str) -> dict[str, Any]:
    """What the mapping of ``data`` by ``features`` depends on (the key is its sha256). Reads the
    feature config (raising its one-line ValueError on a mistake) and lists the raw files."""
    from cctl_rec.data.features.prepare import SPLIT_KEYS, resolve_files
    from cctl_rec.data.features.spec import load_features

    spec = load_features(features)

    def stat(p: str) -> list[Any]:
        st = os.stat(p)
        return [os.path.abspath(p), st.st_size, st.st_mtime_ns]

    files = {f"{d}/{s}": [stat(p) for p in resolve_files(data, spec.files(d, s), f"domains.{d}.files.{s}")]
             for d, s in SPLIT_KEYS}
    vocabs = {s.name: stat(s.vocab.path) for s in spec.spaces
              if s.vocab is not None and s.vocab.path and os.path.exists(s.vocab.path)}
    return {"features": {"path": os.path.abspath(features), "sha256": sha256_file(features)},
            "data": os.path.abspath(data), "files": files, "vocabs": vocabs}


def cache_key(source: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]


def _complete(path: str) -> bool:
    return storage.has_name(path, SOURCE_JSON)


def _read_source(path: str) -> dict[str, Any]:
    with g_pathmgr.open(join(path, SOURCE_JSON), "r") as f:
        return json.load(f)


def _first_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The first input that differs between two cache sources, as a phrase."""
    if old.get("features", {}).get("sha256") != new["features"]["sha256"]:
        return (f"the feature config {new['features']['path']} differs from the one it was mapped with "
                f"({old.get('features', {}).get('path')})")
    if old.get("data") != new["data"]:
        return f"--data is {new['data']}, it was mapped from {old.get('data')}"
    for group in ("files", "vocabs"):
        a, b = old.get(group, {}), new[group]
        for k in sorted(set(a) | set(b)):
            ea = a.get(k) or []
            eb = b.get(k) or []
            if group == "vocabs":
                ea, eb = [ea] if ea else [], [eb] if eb else []
            if ea != eb:
                changed = [e for e in eb if e not in ea] + [e for e in ea if e not in eb]
                what = "raw file" if group == "files" else "reused vocabulary"
                return f"{k}'s {what} {changed[0][0] if changed else k} changed (name, size or modification time)"
    return "its inputs differ"


def _stale(root: str, key: str) -> list[str]:
    """Complete mappings of other keys below ``root``."""
    return [n for n in storage.list_names(root) if n != key and not n.startswith(".") and _complete(join(root, n))]


@contextlib.contextmanager
def _local_lock(run_dir: str) -> Iterator[None]:
    from cctl_rec.train.rundir import run_dir_lock

    if storage.is_remote(run_dir):
        yield
        return
    os.makedirs(run_dir, exist_ok=True)
    with run_dir_lock(run_dir):
        yield


def ensure_prepared(features: str, data: str, run_dir: str, rank: int = 0, timeout: float = 3600.0
                    ) -> tuple[str, bool]:
    """The path of ``data`` mapped by ``features`` below ``run_dir`` (mapped by rank 0 if no
    rank did yet; other ranks wait for it), and whether this call created ``run_dir``.

    Args:
        features: the feature config YAML.
        data: the raw data root (local).
        run_dir: the run directory (local, or a URL).
        rank: this process's rank; only rank 0 maps.
        timeout: seconds a rank other than 0 waits for rank 0's mapping.

    Raises:
        ValueError: a mistake in the config or the data (nothing written), a run directory whose
            checkpoints were trained on another mapping, or the wait timed out.
    """
    if storage.is_remote(data):
        raise ValueError(f"--data {data}: with --features, --data is the raw logs' directory, read locally; "
                         f"expected a local path (the run directory may be a URL)")
    if storage.is_remote(run_dir):  # g_pathmgr's handler (the CLI registered it when it checked the URL)
        storage.register(storage.scheme_of(run_dir))
    source = cache_source(features, data)
    key = cache_key(source)
    root = join(run_dir, PREPARED)
    final = join(root, key)
    if _complete(final):
        _check_cached(final, source, key)
        logger.info("reusing the mapping of %s by %s in %s", data, features, final)
        return final, False
    if rank != 0:
        return _wait(final, source, key, rank, timeout), False

    from cctl_rec.train.checkpoint import list_checkpoints

    stale = _stale(root, key)
    if stale and list_checkpoints(run_dir):
        old = join(root, stale[0])
        raise ValueError(f"run directory {run_dir} holds checkpoints of a run on the mapping {old}, but "
                         f"{_first_difference(_read_source(old), source)}; a run directory holds one run "
                         f"(same feature config and raw data): use a new --run-dir, or the config and data "
                         f"it was trained on")
    made = not g_pathmgr.exists(run_dir) if not storage.is_remote(run_dir) else not storage.list_names(run_dir)
    t0 = time.monotonic()
    try:
        with _local_lock(run_dir):
            if _complete(final):  # another train finished it meanwhile
                return final, made
            _map(features, data, root, final, source, key, t0)
    except BaseException:
        if made:
            _remove(run_dir)
        raise
    for name in stale:  # no checkpoint was trained on them: the old config's mappings go
        _remove(join(root, name))
        logger.info("removed %s, the mapping of an earlier feature config or raw data", join(root, name))
    return final, made


def _map(features: str, data: str, root: str, final: str, source: dict[str, Any], key: str, t0: float) -> None:
    from cctl_rec.data.features.prepare import prepare

    remote = storage.is_remote(final)
    tmp = final if remote else join(root, f".tmp-{key}-{os.getpid()}@{socket.gethostname()}")
    try:
        manifest = prepare(features, data, tmp)
        record = {"key": key, **source, "mapped_by": {"rank": 0, "host": socket.gethostname(), "pid": os.getpid()},
                  "seconds": round(time.monotonic() - t0, 3),
                  "rows": {k: v["rows"] for k, v in manifest["stats"]["splits"].items()}}
        atomic_write_bytes(join(tmp, SOURCE_JSON), (json.dumps(record, indent=2) + "\n").encode())
        if not remote:
            try:
                os.rename(tmp, final)
            except OSError:  # a directory of that name appeared meanwhile: the first one stays
                if not _complete(final):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        _remove(tmp)
        with contextlib.suppress(OSError):
            if not remote and not os.listdir(root):
                os.rmdir(root)
        raise
    if not remote:  # temp directories of killed attempts on this host
        for name in storage.list_names(root):
            head, _, host = name.partition("@")
            pid = head.rsplit("-", 1)[-1]
            if name.startswith(".tmp-") and host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                _remove(join(root, name))
    logger.info("mapped %s in %.1f s", final, time.monotonic() - t0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: str) -> None:
    storage.remove_tree(path, first=SOURCE_JSON)


def _check_cached(final: str, source: dict[str, Any], key: str) -> None:
    """A complete mapping under this key was made from these inputs (its source.json says so)."""
    try:
        old: Optional[dict[str, Any]] = _read_source(final)
    except (OSError, ValueError):
        old = None
    if old is None or old.get("key") != key or {k: old.get(k) for k in source} != source:
        what = _first_difference(old, source) if old else f"its {SOURCE_JSON} cannot be read"
        raise ValueError(f"the cached mapping {final} is not this feature config's mapping of these raw logs: {what}; "
                         f"remove {final} to map again")


def _wait(final: str, source: dict[str, Any], key: str, rank: int, timeout: float) -> str:
    t0 = time.monotonic()
    logger.info("rank %d waits for rank 0 to map the raw logs into %s", rank, final)
    while not _complete(final):
        if time.monotonic() - t0 > timeout:
            raise ValueError(f"rank {rank} waited {timeout:g} s for rank 0 to map the raw logs into {final} and it "
                             f"is not there; rank 0 failed (see its log) or is still mapping (raise "
                             f"--prepare-timeout), or this rank does not see rank 0's run directory (every rank "
                             f"needs the same run directory: a shared filesystem or a URL) or reads other raw "
                             f"files or another feature config than rank 0 (another key)")
        time.sleep(POLL_S if not storage.is_remote(final) else 4 * POLL_S)
    _check_cached(final, source, key)
    logger.info("rank %d: the mapping %s is there after %.1f s", rank, final, time.monotonic() - t0)
    return final
