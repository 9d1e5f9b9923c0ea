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
from typing import Any, Literal, Optional

from iopath.common.file_io import g_pathmgr
from pydantic import BaseModel, ConfigDict, Field

from cctl_rec.safe_io import decode_json, read_bounded, regular_file, short, validate

logger = logging.getLogger(__name__)

FORMAT = "cctl-rec/v1"
MANIFEST = "manifest.json"
REQUIRED_KEYS = ("format", "schema", "splits", "split_rule", "max_seq_len", "preset", "params",
                 "seed", "version", "stats")
SPLITS = ("tgt/train", "tgt/valid", "tgt/test", "src/train")
MAX_MANIFEST_BYTES = 256 << 20
"""A manifest larger than this is refused unread (a million shards take ~200 MB)."""
MAX_ROWS = 1 << 62
"""Bound on a table's rows and a shard's rows / bytes in a manifest (int64 arithmetic stays exact)."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class FeatureJSON(_Strict):
    name: str = Field(min_length=1, max_length=200)
    token: Literal["user", "item", "context"]
    cardinality: int = Field(gt=0, le=MAX_ROWS)
    table: str = Field(min_length=1, max_length=200)
    multi: bool = False
    pooling: Literal["mean", "sum"] = "mean"
    dim: int = Field(default=0, ge=0, le=1 << 16)


class DenseFeatureJSON(_Strict):
    name: str = Field(min_length=1, max_length=200)
    token: Literal["user", "item", "context"]


class DomainSchemaJSON(_Strict):
    domain: Literal["src", "tgt"]
    features: list[FeatureJSON] = Field(min_length=1, max_length=10_000)
    dense: list[DenseFeatureJSON] = Field(default_factory=list, max_length=10_000)


class SchemasJSON(_Strict):
    src: DomainSchemaJSON
    tgt: DomainSchemaJSON


class ShardJSON(_Strict):
    path: str = Field(min_length=1, max_length=4096)
    rows: int = Field(ge=0, le=MAX_ROWS)
    sha256: str = Field(pattern=r"^([0-9a-f]{64})?$")
    bytes: Optional[int] = Field(default=None, ge=0, le=MAX_ROWS)


class ManifestJSON(_Strict):
    """manifest.json (format ``cctl-rec/v1``): what the tool reads is typed; the rest must be present."""

    format: Literal["cctl-rec/v1"]
    schema_: SchemasJSON = Field(alias="schema")
    splits: dict[str, list[ShardJSON]]
    split_rule: Any
    max_seq_len: Any
    preset: Any
    params: Any
    seed: Any
    version: Any
    stats: Any


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


def sha256_file(path: str, chunk: int = 1 << 22, max_bytes: Optional[int] = None) -> str:
    """Hex sha256 of a file's bytes; with ``max_bytes`` (its size when it was checked), a file
    that turns out longer raises ValueError instead of being read on."""
    h = hashlib.sha256()
    n = 0
    with g_pathmgr.open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            n += len(b)
            if max_bytes is not None and n > max_bytes:
                raise ValueError(f"data file {path} holds more than the {max_bytes:,} bytes it had when it was "
                                 f"checked; it is changing while it is read")
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
    manifest = decode_json(read_bounded(path, MAX_MANIFEST_BYTES, "dataset manifest"), path)
    _check(manifest, where=path)
    return manifest


def _check(manifest: Any, where: str) -> None:
    """Raises one ValueError naming ``where`` and the key: the manifest's shape (ManifestJSON),
    shard paths inside the dataset, and every feature's cardinality equal to the rows of the
    table it is looked up in (features sharing a table agree)."""
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{where}: format is {short(manifest.get('format'))}, expected {FORMAT!r}")
    validate(ManifestJSON, manifest, where, "cctl-rec dataset manifest")
    for split, entries in manifest["splits"].items():
        for e in entries:
            _check_relpath(e["path"], split, where)
    from cctl_rec.schema import DomainSchema

    for d in ("src", "tgt"):
        if manifest["schema"][d]["domain"] != d:
            raise ValueError(f"{where}: schema.{d}.domain is {short(manifest['schema'][d]['domain'])}; expected {d!r}")
        try:  # repeated features, user_id / item_id / seq present, seq's table one of the domain's
            DomainSchema.from_json(manifest["schema"][d])
        except ValueError as e:
            raise ValueError(f"{where}: schema.{d}: {e}") from None
        check_schema_tables(manifest["schema"][d], f"{where}: schema.{d}")


def check_schema_tables(domain: dict[str, Any], where: str) -> None:
    """Raises ValueError unless every feature of a (validated) domain schema has the cardinality of
    the table it is looked up in: ids are range-checked against the feature's cardinality and
    looked up in the table, so a larger one would let ids past the table's end."""
    feats = domain["features"]
    rows: dict[str, tuple[str, int]] = {}
    for f in feats:  # a table's rows: the cardinality of the feature named like it, else its first user
        if f["name"] == f["table"]:
            rows[f["table"]] = (f["name"], f["cardinality"])
    for f in feats:
        rows.setdefault(f["table"], (f["name"], f["cardinality"]))
    for f in feats:
        owner, n = rows[f["table"]]
        if f["cardinality"] != n:
            raise ValueError(f"{where}: feature {f['name']!r} has cardinality {f['cardinality']} but is looked up "
                             f"in table {f['table']!r} of {n} rows (the cardinality of {owner!r}); expected the "
                             f"same cardinality for every feature of a table")


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
    size = regular_file(path, "data file")  # a device or FIFO is refused whatever the mode: reading it never ends
    if mode == "none":
        return
    want = entry.get("bytes")
    if want is not None and size >= 0 and size != int(want):
        raise ValueError(f"data file {path} has {size} bytes, the manifest recorded "
                         f"{int(want)}; the file changed after the manifest was written "
                         f"(regenerate it, or set data.verify=none to skip)")
    if mode == "sha256" and entry.get("sha256"):
        got = sha256_file(path, max_bytes=size if size >= 0 else None)
        if got != entry["sha256"]:
            raise ValueError(f"data file {path} has sha256 {got[:16]}..., the manifest recorded "
                             f"{str(entry['sha256'])[:16]}...; the file changed after the manifest was written "
                             f"(regenerate it, or set data.verify=none to skip)")


def verify_shard(root: str, entry: dict[str, Any]) -> bool:
    """True when the shard exists with the recorded size (if any) and sha256."""
    path = join(root, entry["path"])
    if not g_pathmgr.exists(path):
        return False
    try:
        size = regular_file(path, "data file")
    except (OSError, ValueError):
        return False
    if entry.get("bytes") is not None and size >= 0 and size != int(entry["bytes"]):
        return False
    return sha256_file(path, max_bytes=size if size >= 0 else None) == entry["sha256"]
