"""One I/O layer for local paths and remote URLs: iopath's ``g_pathmgr`` in front, fsspec behind.

Every read and write of the tool already goes through ``g_pathmgr`` (manifests, shards, JSON
files). This module registers an iopath handler per remote scheme that delegates to fsspec, so
``s3://bucket/data`` works wherever ``data/`` does. fsspec rather than iopath's own remote
handlers or ``pyarrow.fs``: it is the one library with S3, GCS, Azure, HDFS and in-memory
filesystems behind a single interface, it is what PyTorch's distributed checkpoint speaks
(``torch.distributed.checkpoint.FsspecWriter`` / ``FsspecReader``), and pyarrow reads Parquet from
its file objects; iopath ships no S3 handler, and ``pyarrow.fs`` has no DCP writer.

Credentials and endpoints come from the scheme's usual environment (for S3: ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL`` for an S3-compatible server).

:func:`check_location` is called by the CLI on every path argument before a command runs: an
unknown scheme, a scheme whose fsspec package is not installed, a missing bucket, missing
credentials, an unreachable endpoint, or a URL given to an option that takes local paths only is
one ValueError (one line, exit 2), before anything is written.

Example::

    from cctl_rec.storage import check_location
    check_location("s3://bucket/data", "--out", remote_ok=True)   # raises ValueError if unusable
    with g_pathmgr.open("s3://bucket/data/manifest.json") as f: ...
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from typing import Any, Optional

from iopath.common.file_io import PathHandler, g_pathmgr

from cctl_rec.safe_io import first_line

LOCAL_SCHEMES = ("file",)
_REGISTERED: set[str] = set()


def scheme_of(path: str) -> Optional[str]:
    """``"s3"`` for ``s3://b/k``; None for a plain local path."""
    head, sep, _ = path.partition("://")
    return head.lower() if sep and head.replace("+", "").replace("-", "").isalnum() else None


def _storage_options(scheme: str) -> dict[str, Any]:
    """Fail fast on an unreachable S3 endpoint (botocore retries for minutes by default)."""
    if scheme in ("s3", "s3a"):  # the environment in the options: fsspec caches one instance per options
        env = os.environ.get
        return {"endpoint_url": env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
                "key": env("AWS_ACCESS_KEY_ID"), "secret": env("AWS_SECRET_ACCESS_KEY"),
                "config_kwargs": {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2}}}
    return {}


def filesystem(scheme: str):
    """The fsspec filesystem of ``scheme`` (cached by fsspec per scheme and options)."""
    import fsspec

    return fsspec.filesystem(scheme, **_storage_options(scheme))


def is_remote(path: str) -> bool:
    """True for a URL that fsspec serves (``s3://b/k``); False for local paths and ``file://``."""
    scheme = scheme_of(path)
    return scheme is not None and scheme not in LOCAL_SCHEMES


def cache_root() -> str:
    """Where remote files are cached and remote run directories stage local files:
    ``CCTL_REC_CACHE``, default ``$TMPDIR/cctl-rec-cache``."""
    return os.environ.get("CCTL_REC_CACHE") or os.path.join(tempfile.gettempdir(), "cctl-rec-cache")


def _fs(url: str):
    scheme = scheme_of(url)
    assert scheme is not None, f"not a URL: {url}"
    return filesystem(scheme)


def _fresh(fs: Any, url: str) -> None:
    """Drops fsspec's listing cache at and below ``url``: another process (another rank, an
    earlier attempt of the job) may have written there since this one listed it."""
    path = fs._strip_protocol(url).rstrip("/")
    fs.invalidate_cache(path)  # the path and its parents
    cache = getattr(fs, "dircache", None)
    if cache is not None:
        for key in [k for k in list(cache) if k.startswith(path + "/")]:
            cache.pop(key, None)


def list_names(url: str) -> list[str]:
    """Names of the objects and prefixes directly below ``url`` (or of a local directory's
    entries), sorted; [] when there are none."""
    if not is_remote(url):
        return sorted(os.listdir(url)) if os.path.isdir(url) else []
    fs = _fs(url)
    _fresh(fs, url)
    try:
        return sorted({p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(url, detail=False)})
    except FileNotFoundError:
        return []


def find_names(url: str, pattern: str) -> list[str]:
    """Paths below ``url`` (relative to it, sorted) that match the glob ``pattern`` (one listing)."""
    fs = _fs(url)
    _fresh(fs, url)
    base = fs._strip_protocol(url).rstrip("/") + "/"
    return sorted(p[len(base):] for p in fs.glob(base + pattern) if p.startswith(base))


def write_object(url: str, data: bytes) -> None:
    """One object, in one request: on S3, GCS and Azure it is visible only once complete."""
    _fs(url).pipe_file(url, data)


def has_name(url: str, name: str) -> bool:
    """Whether ``url/name`` exists; below a URL, in a listing made now (another process may have
    written it since this one last listed there)."""
    if not is_remote(url):
        return os.path.exists(os.path.join(url, name))
    return name in list_names(url)


def remove_tree(url: str, first: Optional[str] = None) -> None:
    """Removes every object below ``url`` (and ``url`` itself; a local directory too); ``first``
    (a name below it, the marker that makes it count as complete) goes before the rest, so a
    removal cut short leaves an incomplete prefix, never a complete-looking one."""
    if not is_remote(url):
        if first is not None and os.path.isfile(os.path.join(url, first)):
            os.remove(os.path.join(url, first))
        shutil.rmtree(url, ignore_errors=True)
        return
    fs = _fs(url)
    _fresh(fs, url)
    if first is not None:
        marker = url.rstrip("/") + "/" + first
        if fs.exists(marker):
            fs.rm(marker)
    if fs.exists(url):
        fs.rm(url, recursive=True)
    _fresh(fs, url)


def copy_tree(src: str, dst: str) -> None:
    """Copies every object below ``src`` to the same relative key below ``dst`` (server side)."""
    fs = _fs(src)
    _fresh(fs, src)
    base = fs._strip_protocol(src).rstrip("/") + "/"
    for p in fs.find(base):
        fs.copy(p, dst.rstrip("/") + "/" + p[len(base):])


def put_file(local: str, url: str) -> None:
    """Uploads one local file to ``url``."""
    _fs(url).put_file(local, url)


def _keeping_options(base: type) -> type:
    """``base`` (DCP's FsspecWriter / FsspecReader) whose ``reset(checkpoint_id)`` keeps the storage
    options. DCP resets a storage writer or reader to the ``checkpoint_id`` it is given, and the base
    class then looks the filesystem up again *without* options: fsspec's cached instance for no
    options, whose endpoint is whatever the environment said when it was first made (measured: a
    second moto server in the same process got the first one's stopped port)."""

    class KeepingOptions(base):  # type: ignore[valid-type, misc]
        def __init__(self, path: str, **kwargs: Any) -> None:
            self._options = _storage_options(scheme_of(path))
            super().__init__(path, **kwargs, **self._options)

        def reset(self, checkpoint_id: Any = None) -> None:
            super().reset(None)  # a fresh save / load id, the path untouched
            if checkpoint_id:
                self.path = self.fs.init_path(checkpoint_id, **self._options)

    KeepingOptions.__name__ = KeepingOptions.__qualname__ = base.__name__
    return KeepingOptions


def dcp_writer(path: str) -> Any:
    """DCP's storage writer for ``path``: None for a local path (DCP's own file writer, as
    before), an ``FsspecWriter`` for a URL (no fsync: an object is durable once written)."""
    if not is_remote(path):
        return None
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    return _keeping_options(FsspecWriter)(path, sync_files=False)


def dcp_reader(path: str) -> Any:
    """DCP's storage reader for ``path``: None for a local path, an ``FsspecReader`` for a URL."""
    if not is_remote(path):
        return None
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return _keeping_options(FsspecReader)(path)


class FsspecPathHandler(PathHandler):
    """iopath handler for one URL scheme, delegating to fsspec.

    ``get_local_path`` downloads a remote file once into a cache directory (``CCTL_REC_CACHE``,
    default ``$TMPDIR/cctl-rec-cache``) keyed by URL, size and modification tag.
    """

    def __init__(self, scheme: str) -> None:
        super().__init__()
        self.scheme = scheme

    @property
    def fs(self):
        return filesystem(self.scheme)

    def _get_supported_prefixes(self) -> list[str]:
        return [f"{self.scheme}://"]

    def _get_local_path(self, path: str, force: bool = False, **kwargs: Any) -> str:
        info = self.fs.info(path)
        tag = f"{path}|{info.get('size')}|{info.get('ETag') or info.get('mtime') or info.get('LastModified')}"
        local = os.path.join(cache_root(), hashlib.sha256(tag.encode()).hexdigest()[:32], os.path.basename(path))
        if force or not os.path.exists(local):
            os.makedirs(os.path.dirname(local), exist_ok=True)
            tmp = f"{local}.tmp-{os.getpid()}"
            self.fs.get(path, tmp)
            os.replace(tmp, local)
        return local

    def _copy_from_local(self, local_path: str, dst_path: str, overwrite: bool = False, **kwargs: Any) -> None:
        if not overwrite and self.fs.exists(dst_path):
            raise FileExistsError(f"{dst_path} exists")
        self.fs.put(local_path, dst_path)

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs: Any):
        return self.fs.open(path, mode)

    def _copy(self, src_path: str, dst_path: str, overwrite: bool = False, **kwargs: Any) -> bool:
        if not overwrite and self.fs.exists(dst_path):
            return False
        self.fs.copy(src_path, dst_path)
        return True

    def _mv(self, src_path: str, dst_path: str, **kwargs: Any) -> bool:
        self.fs.mv(src_path, dst_path)
        return True

    def _exists(self, path: str, **kwargs: Any) -> bool:
        return self.fs.exists(path)

    def _isfile(self, path: str, **kwargs: Any) -> bool:
        return self.fs.isfile(path)

    def _isdir(self, path: str, **kwargs: Any) -> bool:
        return self.fs.isdir(path)

    def _ls(self, path: str, **kwargs: Any) -> list[str]:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(path, detail=False)]

    def _mkdirs(self, path: str, **kwargs: Any) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def _rm(self, path: str, **kwargs: Any) -> None:
        self.fs.rm(path, recursive=self.fs.isdir(path))


def register(scheme: str) -> None:
    """Routes ``scheme://`` paths of ``g_pathmgr`` to fsspec (once per scheme and process)."""
    if scheme in _REGISTERED or scheme in LOCAL_SCHEMES:
        return
    g_pathmgr.register_handler(FsspecPathHandler(scheme), allow_override=True)
    _REGISTERED.add(scheme)


def check_location(path: str, flag: str, remote_ok: bool, remote_options: str = "") -> None:
    """Refuses, as one ValueError naming ``flag`` and ``path``, a URL the tool cannot use here.

    Local paths (and ``file://``) pass unchecked. A URL passes when ``remote_ok``, its scheme is
    an installed fsspec filesystem, and its bucket (the first path component) exists and answers
    with the credentials at hand; then its scheme is registered with ``g_pathmgr``.
    """
    scheme = scheme_of(path)
    if scheme is None or scheme in LOCAL_SCHEMES:
        return
    import fsspec

    try:
        fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ValueError(f"{flag} {path}: unknown URL scheme {scheme!r}; expected a local path or a URL of a "
                         f"filesystem fsspec knows (s3://, gs://, az://, hdfs://, memory://)") from None
    except ImportError as e:
        raise ValueError(f"{flag} {path}: the {scheme}:// scheme needs a package that is not installed "
                         f"({first_line(e)})") from None
    if not remote_ok:
        raise ValueError(f"{flag} {path}: this option takes a local path; remote URLs are supported for "
                         f"{remote_options or 'other options'} so far (docs/storage.md)")
    bucket = path.split("://", 1)[1].split("/", 1)[0]
    if not bucket:
        raise ValueError(f"{flag} {path}: the URL names no bucket; expected {scheme}://BUCKET/PATH")
    fs = filesystem(scheme)
    fs.invalidate_cache()  # a command sees the bucket as it is now, not as this process listed it before
    try:  # a listing, not exists(): s3fs's exists() answers False for missing credentials too
        fs.ls(f"{scheme}://{bucket}", detail=False)
    except FileNotFoundError:
        raise ValueError(f"{flag} {path}: bucket {bucket!r} does not exist; create it first") from None
    except Exception as e:  # credentials, endpoint, DNS, permissions: whatever the backend raises
        raise ValueError(f"{flag} {path}: cannot reach {scheme}://{bucket} ({type(e).__name__}: {first_line(e)}); "
                         f"check the credentials and the endpoint (for S3: AWS_ACCESS_KEY_ID, "
                         f"AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)") from None
    register(scheme)
