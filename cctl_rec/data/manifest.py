"""``manifest.json``: the index of a dataset directory (written last, read by the trainer).

Shape (format ``cctl-rec/v1``)::

    {"format": "cctl-rec/v1",
     "schema": {"src": <DomainSchema.to_json()>, "tgt": <...>},
     "splits": {"tgt/train": [{"path": "tgt/train/part-00000.parquet", "rows": N,
                               "sha256": "<hex>", "bytes": B}, ...],
                "tgt/valid": [...], "tgt/test": [...], "src/train": [...]},
     "split_rule": "<text>", "max_seq_len": 20, "preset": "tiny", "params": {...},
     "seed": 0, "version": "<cctl_rec.__version__>", "stats": {...}}

All IO goes through iopath's ``g_pathmgr``, so ``root`` may be a local path or any URI with a
registered handler. Writes are atomic (temp name in the same directory, then rename).

Example::

    m = read_manifest("data/tiny")
    files = shard_paths("data/tiny", m, "tgt/train")
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from typing import Any

from iopath.common.file_io import g_pathmgr

logger = logging.getLogger(__name__)

FORMAT = "cctl-rec/v1"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "schema", "splits", "split_rule", "max_seq_len", "preset", "params",
                 "seed", "version", "stats")
SPLITS = ("tgt/train", "tgt/valid", "tgt/test", "src/train")


def is_local(path: str) -> bool:
    """True for plain filesystem paths (``file://`` URIs excluded: iopath handles those)."""
    return "://" not in path


def join(root: str, *parts: str) -> str:
    """Joins path parts below ``root``, for local paths and URIs alike."""
    if is_local(root):
        return os.path.join(root, *parts)
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def temp_name(path: str) -> str:
    """A unique hidden temp name next to ``path`` (``dir/.name.tmp-<pid>-<hex>``)."""
    if is_local(path):
        head, name = os.path.split(path)
    else:
        head, _, name = path.rpartition("/")
    tmp = f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    return join(head, tmp) if head else tmp


def replace(src: str, dst: str) -> None:
    """Renames ``src`` to ``dst``, replacing it (atomic ``os.replace`` on local paths)."""
    if is_local(src) and is_local(dst):
        os.replace(src, dst)
        return
    if g_pathmgr.exists(dst):
        g_pathmgr.rm(dst)
    if not g_pathmgr.mv(src, dst):
        raise OSError(f"could not rename {src} to {dst}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temp file in the same directory, then renames."""
    tmp = temp_name(path)
    try:
        with g_pathmgr.open(tmp, "wb") as f:
            f.write(data)
        replace(tmp, path)
    except BaseException:
        if g_pathmgr.exists(tmp):
            g_pathmgr.rm(tmp)
        raise


def sha256_file(path: str, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with g_pathmgr.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_size(path: str) -> int:
    """Size in bytes (local stat; otherwise by reading the file)."""
    if is_local(path):
        return os.path.getsize(path)
    n = 0
    with g_pathmgr.open(path, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return n
            n += len(b)


def write_manifest(root: str, manifest: dict[str, Any]) -> str:
    """Writes ``root/manifest.json`` atomically and returns its path.

    Args:
        root: the dataset directory (local path or URI).
        manifest: a dict with every key of :data:`REQUIRED_KEYS` and ``format`` == FORMAT.
    """
    _check(manifest, where="manifest to write")
    path = join(root, MANIFEST)
    atomic_write_bytes(path, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))
    logger.info("wrote %s", path)
    return path


def read_manifest(root: str) -> dict[str, Any]:
    """Reads and checks ``root/manifest.json``.

    Raises:
        FileNotFoundError: ``root`` or its manifest does not exist.
        ValueError: the manifest is not JSON, has another format or lacks keys.
    """
    if not g_pathmgr.exists(root):
        raise FileNotFoundError(f"dataset directory {root!r} does not exist; "
                                f"create one with `cctl-rec datagen --out {root}`")
    path = join(root, MANIFEST)
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"{path} not found: {root!r} is not a finished dataset "
                                f"(a datagen run writes the manifest last)")
    with g_pathmgr.open(path, "r") as f:
        text = f.read()
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    _check(manifest, where=path)
    return manifest


def _check(manifest: Any, where: str) -> None:
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    if not isinstance(manifest["splits"], dict):
        raise ValueError(f"{where}: 'splits' must map split names to shard lists")
    for split, entries in manifest["splits"].items():
        for e in entries:
            if not isinstance(e, dict) or not {"path", "rows", "sha256"} <= e.keys():
                raise ValueError(f"{where}: split {split!r} has a shard entry without "
                                 f"path/rows/sha256: {e!r}")
            _check_relpath(e["path"], split, where)


def _check_relpath(rel: Any, split: str, where: str) -> None:
    """A shard path must stay inside the dataset directory: relative, no ``..``, no scheme."""
    parts = str(rel).replace("\\", "/").split("/")
    if (not isinstance(rel, str) or not rel or rel.startswith(("/", "\\")) or "://" in rel
            or ".." in parts or (len(rel) > 1 and rel[1] == ":")):
        raise ValueError(f"{where}: split {split!r} names shard path {rel!r}; expected a relative path "
                         f"inside the dataset directory")


def shard_paths(root: str, manifest: dict[str, Any], split: str) -> list[str]:
    """Full paths of a split's shards, in order.

    Args:
        root: the dataset directory the manifest was read from.
        manifest: as returned by :func:`read_manifest`.
        split: ``tgt/train``, ``tgt/valid``, ``tgt/test`` or ``src/train``.
    """
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} is not in the manifest; expected one of "
                         f"{sorted(manifest['splits'])}")
    return [join(root, e["path"]) for e in manifest["splits"][split]]


VERIFY_MODES = ("none", "size", "sha256")


def check_shard(root: str, entry: dict[str, Any], mode: str = "sha256") -> None:
    """Raises when a shard differs from its manifest entry: FileNotFoundError when it is gone,
    ValueError when its size (``mode`` size or sha256) or sha256 (``mode`` sha256) differs.
    An entry without ``bytes`` or with an empty ``sha256`` skips that check."""
    if mode not in VERIFY_MODES:
        raise ValueError(f"verify mode must be one of {list(VERIFY_MODES)}, got {mode!r}")
    path = join(root, entry["path"])
    if not g_pathmgr.exists(path):
        raise FileNotFoundError(f"data file {path} is listed in {join(root, MANIFEST)} but does not exist")
    if mode == "none":
        return
    if "bytes" in entry and is_local(path) and os.path.getsize(path) != int(entry["bytes"]):
        raise ValueError(f"data file {path} has {os.path.getsize(path)} bytes, the manifest recorded "
                         f"{int(entry['bytes'])}; the file changed after the manifest was written "
                         f"(regenerate it, or set data.verify=none to skip)")
    if mode == "sha256" and entry.get("sha256"):
        got = sha256_file(path)
        if got != entry["sha256"]:
            raise ValueError(f"data file {path} has sha256 {got[:16]}..., the manifest recorded "
                             f"{str(entry['sha256'])[:16]}...; the file changed after the manifest was written "
                             f"(regenerate it, or set data.verify=none to skip)")


def verify_shard(root: str, entry: dict[str, Any]) -> bool:
    """True when the shard exists with the recorded size (if any) and sha256."""
    path = join(root, entry["path"])
    if not g_pathmgr.exists(path):
        return False
    if "bytes" in entry and is_local(path) and os.path.getsize(path) != int(entry["bytes"]):
        return False
    return sha256_file(path) == entry["sha256"]
