"""Bounded reads of the files cctl-rec is handed, and JSON documents checked against a schema.

Every JSON file the tool reads (``manifest.json``, ``metrics.json``, ``serving.json``, a
checkpoint's ``trainer.json``) goes through :func:`read_json`: it must be a regular file (a device,
FIFO or socket, e.g. a symlink to ``/dev/zero``, is refused before it is opened), at most ``limit``
bytes, UTF-8, nested at most :data:`MAX_DEPTH` deep, and it is validated with a pydantic model.
Each problem is one ``ValueError`` naming the file and the key. Values quoted in an error go
through :func:`short`, so an error line stays short whatever the input holds.

Example::

    meta = read_json("runs/r/metrics.json", MetricsFile, "metrics file", limit=64 << 20)
"""

from __future__ import annotations

import errno
import json
import os
import reprlib
import stat
from typing import TYPE_CHECKING, Any, Optional

from iopath.common.file_io import g_pathmgr

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG)
"""OSErrors of the machine rather than the user (full, read-only, failing disk; a file beyond the
file-size limit): one line, exit code 1."""


def disk_error(e: BaseException) -> Optional[OSError]:
    """The OSError of a full, read-only or failing disk behind ``e``, if any: ``e`` itself, the
    per-rank errors a DCP ``CheckpointException`` collected (``failures``), or what ``e`` was raised
    from or while handling. torch's file writer turns a real ENOSPC into ``RuntimeError:
    [enforce fail at inline_container.cc] ... unexpected pos`` raised while handling the OSError."""
    seen: set[int] = set()
    todo: list[Any] = [e]
    while todo:
        x = todo.pop()
        if not isinstance(x, BaseException) or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return x
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo.extend(f[0] for f in failures.values() if isinstance(f, tuple) and f)
        todo.extend([x.__cause__, x.__context__])
    return None


MAX_DEPTH = 64
"""Deepest nesting of lists / objects accepted in a JSON or YAML document the tool reads."""

_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 6


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type's name
    when the message is empty): what a one-line error quotes of a library's error."""
    lines = str(e).strip().splitlines()
    return (lines[0][:limit] if lines else "") or type(e).__name__


def short(value: Any, limit: int = 80) -> str:
    """A bounded ``repr`` of ``value`` (nested containers and long strings cut with ``...``):
    safe for any input, however large or deeply shared its structure is."""
    if isinstance(value, str):  # its start, quoted as repr quotes it
        text = repr(value[:limit])
        return text if len(value) <= limit else text + "..."
    try:
        text = _REPR.repr(value)
    except Exception:  # a repr that fails: name the type only
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_local(path: str) -> bool:
    return "://" not in path


def regular_file(path: str, what: str) -> int:
    """The size of ``path`` after following symlinks; raises unless it is a regular file.

    Raises:
        FileNotFoundError: it does not exist.
        IsADirectoryError: it is a directory.
        ValueError: it is a device, FIFO or socket (reading one may never end).
    """
    if not _is_local(path):
        if not g_pathmgr.exists(path):
            raise FileNotFoundError(f"{what} {path} does not exist")
        return -1
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{what} {path} is a directory; expected a file")
    if not stat.S_ISREG(st.st_mode):
        kind = ("character device" if stat.S_ISCHR(st.st_mode) else "block device" if stat.S_ISBLK(st.st_mode)
                else "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode)
                else "special file")
        link = f" (a link to {os.path.realpath(path)})" if os.path.islink(path) else ""
        raise ValueError(f"{what} {path} is a {kind}{link}, not a regular file; refusing to read it")
    return st.st_size


def read_bounded(path: str, limit: int, what: str) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes (never more is read)."""
    size = regular_file(path, what)
    if size > limit:
        raise ValueError(f"{what} {path} has {size:,} bytes, more than the {limit:,} a {what} may have")
    with g_pathmgr.open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{what} {path} has more than the {limit:,} bytes a {what} may have")
    return data


def depth_exceeds(obj: Any, limit: int = MAX_DEPTH) -> bool:
    """True when lists / dicts nest more than ``limit`` deep (iterative: no recursion limit)."""
    stack = [(obj, 1)]
    seen: set[int] = set()
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, tuple, dict)):
            if d > limit:
                return True
            if id(o) in seen:  # shared (YAML aliases): its depth below was checked already
                continue
            seen.add(id(o))
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return False


def decode_text(raw: bytes, name: str, hint: str = "") -> str:
    """``raw`` as UTF-8; one ValueError naming ``name`` (and ``hint``, e.g. "; expected a JSON file") otherwise."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name} is not UTF-8 text (byte {e.start}: {e.reason}){hint}") from None


def decode_json(raw: bytes, path: str) -> Any:
    """``raw`` (the bytes of ``path``) as JSON; one ValueError naming ``path`` when it is not UTF-8,
    not JSON, or nested deeper than :data:`MAX_DEPTH`."""
    text = decode_text(raw, path, "; expected a JSON file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise ValueError(f"{path} nests lists or objects deeper than Python can parse; expected at most "
                         f"{MAX_DEPTH} levels") from None
    if depth_exceeds(obj):
        raise ValueError(f"{path} nests lists or objects deeper than {MAX_DEPTH} levels")
    return obj


def _loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validation_error(e: "ValidationError", where: str, what: str) -> ValueError:
    """One line from a pydantic error: every missing key, else the first bad key and its value."""
    errs = e.errors(include_url=False)
    missing = [_loc(x["loc"]) for x in errs if x["type"] == "missing"]
    if missing:
        return ValueError(f"{where}: missing keys {missing[:8]}{' ...' if len(missing) > 8 else ''}; expected a "
                          f"{what}")
    x = errs[0]
    msg = x["msg"][:1].lower() + x["msg"][1:]
    return ValueError(f"{where}: key '{_loc(x['loc'])}': {msg}, got {short(x.get('input'))}; expected a {what}")


def validate(model: "type[BaseModel]", obj: Any, where: str, what: str) -> "BaseModel":
    """``model.model_validate(obj)``; a ValidationError becomes one ValueError naming ``where``,
    the key and the value."""
    from pydantic import ValidationError

    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise validation_error(e, where, what) from None


def read_json(path: str, model: "type[BaseModel]", what: str, limit: int) -> Any:
    """Reads ``path`` (bounded, UTF-8 JSON) and validates it with ``model``; returns the plain
    JSON value (dicts and lists), so callers keep their dict access."""
    obj = decode_json(read_bounded(path, limit, what), path)
    validate(model, obj, path, what)
    return obj
