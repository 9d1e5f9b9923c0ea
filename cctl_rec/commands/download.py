"""``cctl-rec download``: a public dataset by name, every file checked against its pinned sha256.

The files come from the public GitHub repositories named in ``docs/data.md`` ("Getting the data"),
at pinned commits (raw.githubusercontent.com URLs), and land in ``--out`` laid out as
``cctl-rec convert`` reads them:

  amazon-books-movies   the paper's Amazon setting, a dense subset (RaghavPu/wasserstein-cdr-embeddings):
                        OUT/Amazon-Books-Dense.inter, OUT/Amazon-Movies-Dense.inter, OUT/dense_users.txt
  disencdr              DisenCDR's four Amazon category pairs (cjx96/DisenCDR, MIT):
                        OUT/LICENSE.txt, OUT/X_Y/{train,test,test_original}.txt for 8 folders

Each file is written under a temporary name, checked (size and sha256), then renamed; a file
already in OUT with the pinned checksum is kept (a rerun resumes); ``OUT/download.json`` (source,
licence, URLs, checksums) is written last. ``--base-url`` fetches from a mirror laid out like OUT
(``BASE/<file as under OUT>``; http(s):// or file://), e.g. an internal copy of an earlier download.

Exit codes: 2 for a wrong checksum or size, an HTTP 4xx (a wrong URL), or a file in OUT that is not
the pinned one (nothing is overwritten); 1 for a network failure (host unreachable, timeout,
connection cut, HTTP 5xx or 429) after ``--retries``, or a full disk. Either way one line on
stderr, and no partial file is left under OUT.

Example::

    cctl-rec download amazon-books-movies --out data/raw/amazon
    cctl-rec convert amazon --src data/raw/amazon/Amazon-Books-Dense.inter \\
        --tgt data/raw/amazon/Amazon-Movies-Dense.inter --out data/amazon
    cctl-rec download disencdr --out data/raw/disencdr
    cctl-rec download disencdr --out data/raw/disencdr --base-url https://mirror.example.com/disencdr
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import logging
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Tuple

logger = logging.getLogger(__name__)

GITHUB_RAW = "https://raw.githubusercontent.com/"
"""Where the default URLs point: ``GITHUB_RAW + repo/commit/path`` (tests point it at loopback)."""
MANIFEST = "download.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class PinnedFile:
    """One file of a dataset.

    Args:
        path: where it lands under --out (and under a --base-url mirror), '/'-separated.
        remote: its path in the source repository at the pinned commit.
        sha256: hex digest of its bytes.
        size: its size in bytes.
    """

    path: str
    remote: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Source:
    """A public dataset: a GitHub repository at a commit, the files taken from it, their licence."""

    name: str
    repo: str
    commit: str
    licence: str
    licence_short: str
    description: str
    files: Tuple[PinnedFile, ...]
    next_step: str

    def default_url(self, f: PinnedFile) -> str:
        return f"{GITHUB_RAW}{self.repo}/{self.commit}/{f.remote}"


_AMAZON_DIR = "data/Amazon-Dense-Subset/"
_DISENCDR_PAIRS = {  # folder -> sha256 and size of train.txt, test.txt, test_original.txt
    "cloth_electronic": (("678124e0dbf8d162041f8b656bd5e89ee2a678df2c85812f94fd7c0bd2062f6f", 1569278),
                         ("0b604b69d3eb531bf99a11e2322f247694f7a593905e0c0c04c54e2a58fb0f78", 161965),
                         ("ab4c404114d7d641edfa1f5759ec1aae9b0cc5eb55c4d5ea61437c43c96b1800", 204562)),
    "cloth_sport": (("3e039ec9baff975cb47722c4704f7d2103c2bbf2a3c30ed2d264e17b69d4fd0a", 1097669),
                    ("0d034810261027b080d506399426d3eb4f26b4b90a121fe79ebaef246a82b1bd", 93917),
                    ("1e35975cd187d2d69a52cd6ae14f1ce8845ad0cba897ca65481e74c3ca487ff2", 124110)),
    "electronic_cloth": (("fbccec759f2acfec35927c07a1a4bd911f75106de34d6b21e7d7a8a7ffc68e81", 2711201),
                         ("1a1a5ce75f986052afc05337ea5d1e5ac44c7017f06f1ecc5ccadb523aadf08d", 181464),
                         ("1db273571bb0e59f7d595c682d4074e9f976bcaf2fe21e15c4623bc16bc14686", 206892)),
    "electronic_phone": (("cb09610ab143478097937c235c4932fe39b5c664d434dd5abba3c5eb5d75f028", 1424620),
                         ("322a8e4c7b5d10e2a3d91dbb2d7833eaf2ba684f4c5109dc1ea4e6ee08119c46", 31982),
                         ("b513255035eb30808e9cc396b180f48df7e6bbd6726ed7415c00f0aab78ba565", 41498)),
    "phone_electronic": (("a439eb3fdf4d08e58da1d86e1f711cf0acf59f28944d347ad4b3fb9454df54f9", 609415),
                         ("a3d0d2fb03c25994c3509af3acc6eeca5009b00751f9b12e28fdf52843a027c6", 31077),
                         ("9e7f12e47f649c721bbe4e45e49d59e3b4cf4aecea0f2f45ac007fa188077b65", 40318)),
    "phone_sport": (("d38cd0da5379bbec03a19cc3eb95a8b52caeeb179dfb515ba2d894b1e193572d", 510647),
                    ("1665b2846c5011ca870ff79bcfb3cc632aa3eeaa6ea9853ee45549ac0858b444", 48067),
                    ("17894bfdd8daecda579ca2f454b4a1282187efc52705b731dd16893c44a0abdb", 60073)),
    "sport_cloth": (("45c517a6fc7721f168411b69eb3f6e6ef896bbe06f599f6f7b4a5844ff925629", 1150235),
                    ("7b43d370047f23cbc6862188aba53b3a3241948255584a1f3f5c189118f16490", 103831),
                    ("79c4f4ca9e6a694652df32c8eabc73f6b6e62719f9579e89a44210ccb0c2d460", 124070)),
    "sport_phone": (("c55f3f576465795163f45cdb6df9484626dfbb12799393a7d06e4401cfcb6f3a", 612708),
                    ("5ff3bc25da94612e7a35672edba277c4acc497cc8d87d268bca891e64dc98640", 45250),
                    ("78cd3e7fa755fc0c7ffe10ab61a20f3626ed81b099dfc633b08e59cf83dcc535", 61239)),
}

SOURCES: Dict[str, Source] = {
    "amazon-books-movies": Source(
        name="amazon-books-movies",
        repo="RaghavPu/wasserstein-cdr-embeddings",
        commit="94e2f03dacb69de125cb85d5b6ef334461baa930",
        licence="Amazon product review data (McAuley et al.), for research use; a dense subset "
                "(items with >= 30 ratings) published in the repository",
        licence_short="Amazon review data, research use",
        description="the paper's Amazon setting: Books (source) and Movies&TV (target) ratings, 1-5 stars",
        files=(PinnedFile("Amazon-Books-Dense.inter", _AMAZON_DIR + "Amazon-Books-Dense.inter",
                          "24c23dfca8e273fcc73a8ee0eb2ba32b05364b4aeb759618ab098fd65a0fd553", 1134791),
               PinnedFile("Amazon-Movies-Dense.inter", _AMAZON_DIR + "Amazon-Movies-Dense.inter",
                          "708e9027df12cec25043d0f0134f6bef5d2a0388ab6ce37e33c1acc177f393e4", 2023014),
               PinnedFile("dense_users.txt", _AMAZON_DIR + "dense_users.txt",
                          "fe0614635d54cfa74caf4067b5f0428449b27c4855842f9b975becbea9ec2769", 22125)),
        next_step="cctl-rec convert amazon --src {out}/Amazon-Books-Dense.inter "
                  "--tgt {out}/Amazon-Movies-Dense.inter --out data/amazon"),
    "disencdr": Source(
        name="disencdr",
        repo="cjx96/DisenCDR",
        commit="4e6d60b",
        licence="MIT (LICENSE.txt, downloaded with the data); the interactions are Amazon product "
                "review data (McAuley et al.)",
        licence_short="MIT",
        description="DisenCDR's four Amazon category pairs, implicit feedback ('user item 1'); folder X_Y "
                    "holds domain X of the pair (X, Y), user ids shared",
        files=(PinnedFile("LICENSE.txt", "LICENSE.txt",
                          "6eab8b65bd7cd306e3c3ddcecc14fdd19dfe030e51cdbfe9643adb151d738ce3", 1061),)
              + tuple(PinnedFile(f"{pair}/{name}", f"dataset/{pair}/{name}", sha, size)
                      for pair, pins in _DISENCDR_PAIRS.items()
                      for name, (sha, size) in zip(("train.txt", "test.txt", "test_original.txt"), pins)),
        next_step="cctl-rec convert implicit --src-dir {out}/sport_phone --tgt-dir {out}/phone_sport "
                  "--out data/phone-sport"),
}


class NetworkError(Exception):
    """The transfer failed for a reason a retry may cure (exit code 1)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("download", help="fetch a public dataset by name (sha256-checked)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(SOURCES), metavar="DATASET",
                   help=" | ".join(sorted(SOURCES)))
    p.add_argument("--out", required=True, help="local directory for the files (created)")
    p.add_argument("--base-url", default="",
                   help="fetch from this mirror instead, laid out like OUT: BASE/<file as under OUT> "
                        "(http://, https:// or file://)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a try fails (default 60)")
    p.add_argument("--retries", type=int, default=3,
                   help="further tries of a file after a network failure, 1, 2, 4 ... s apart (default 3)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        manifest = download(args.dataset, args.out, base_url=args.base_url, timeout=args.timeout,
                            retries=args.retries)
    except NetworkError as e:
        print(f"cctl-rec download: error: {e}", file=sys.stderr)
        return 1
    src = SOURCES[args.dataset]
    n = len(manifest["files"])
    mb = sum(f["size"] for f in manifest["files"]) / 1e6
    print(f"wrote {args.out}: {n} files, {mb:.1f} MB, sha256 checked ({src.repo}@{src.commit[:7]}; "
          f"licence: {src.licence_short}). Next: {src.next_step.format(out=args.out)}")
    return 0


def download(name: str, out: str, base_url: str = "", timeout: float = 60.0, retries: int = 3) -> dict:
    """Fetches dataset ``name`` into ``out``; returns the manifest written as ``out/download.json``.

    Raises:
        ValueError: an unknown name, a bad option, a file in ``out`` that is not the pinned one, an
            HTTP 4xx, or bytes that are not the pinned ones (size or sha256).
        NetworkError: the host unreachable, a timeout, a cut connection or HTTP 5xx / 429, after
            ``retries`` further tries.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(sorted(SOURCES))}")
    if "://" in out:
        raise ValueError(f"--out {out}: download writes a local directory; copy it to remote storage afterwards")
    if timeout <= 0 or retries < 0:
        raise ValueError(f"--timeout must be > 0 and --retries >= 0, got {timeout} and {retries}")
    base = base_url.rstrip("/")
    if base and not base.startswith(("http://", "https://", "file://")):
        raise ValueError(f"--base-url {base_url!r}: expected an http://, https:// or file:// URL")
    src = SOURCES[name]
    if os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"--out {out} exists and is not a directory")

    todo: List[Tuple[PinnedFile, str]] = []
    for f in src.files:  # refuse before fetching anything: nothing in OUT is ever overwritten
        dst = os.path.join(out, *f.path.split("/"))
        url = f"{base}/{f.path}" if base else src.default_url(f)
        if os.path.lexists(dst):
            if not os.path.isfile(dst) or _sha256_file(dst) != (f.sha256, f.size):
                raise ValueError(f"{dst} exists and is not the pinned file (sha256 {f.sha256[:12]}..., "
                                 f"{f.size} bytes); remove it or choose another --out")
            logger.info("%s: already there, checksum ok", dst)
            continue
        todo.append((f, url))

    for i, (f, url) in enumerate(todo):
        dst = os.path.join(out, *f.path.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        logger.info("[%d/%d] %s", i + 1, len(todo), url)
        for attempt in range(retries + 1):
            try:
                _fetch(url, dst, f, timeout)
                break
            except NetworkError as e:
                if attempt == retries:
                    tries = f"{retries + 1} {'try' if retries == 0 else 'tries'}"
                    raise NetworkError(f"{e} (after {tries}; rerun to resume, files already checked are "
                                       "kept)") from None
                wait = min(2.0 ** attempt, 30.0)
                logger.warning("%s; retrying in %.0f s", e, wait)
                time.sleep(wait)

    manifest = {
        "dataset": src.name, "description": src.description, "licence": src.licence,
        "source": {"repo": src.repo, "commit": src.commit, "url": f"https://github.com/{src.repo}/tree/{src.commit}"},
        "base_url": base or None,
        "files": [{"path": f.path, "url": f"{base}/{f.path}" if base else src.default_url(f), "sha256": f.sha256,
                   "size": f.size} for f in src.files],
    }
    _atomic_write(os.path.join(out, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def _sha256_file(path: str) -> Tuple[str, int]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _fetch(url: str, dst: str, f: PinnedFile, timeout: float) -> None:
    """Streams ``url`` into a temp file beside ``dst``, checks size and sha256, renames it to ``dst``."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dst), prefix=f".{os.path.basename(dst)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            h, n = hashlib.sha256(), 0
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "cctl-rec-download"})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    while chunk := resp.read(CHUNK):
                        n += len(chunk)
                        if n > f.size:
                            break  # a wrong file: stop reading, the size check below names it
                        h.update(chunk)
                        fh.write(chunk)
                    left = getattr(resp, "length", None)  # http.client returns b"" when a server hangs up early
                    if n <= f.size and left:
                        raise NetworkError(f"{url}: connection closed after {n} of {n + left} bytes")
            except urllib.error.HTTPError as e:
                if e.code == 429 or e.code >= 500:
                    raise NetworkError(f"{url}: HTTP {e.code} {e.reason}") from None
                raise ValueError(f"{url}: HTTP {e.code} {e.reason} (a wrong --base-url, or the source moved: "
                                 "docs/data.md names it)") from None
            except urllib.error.URLError as e:
                if isinstance(e.reason, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
                    raise ValueError(f"{url}: no such file (a wrong --base-url)") from None
                raise NetworkError(f"{url}: {getattr(e.reason, 'strerror', None) or e.reason}") from None
            except (socket.timeout, TimeoutError):
                raise NetworkError(f"{url}: no data for {timeout:g} s (timeout)") from None
            except (ConnectionError, http.client.HTTPException) as e:  # reset, refused, cut short
                raise NetworkError(f"{url}: connection failed ({type(e).__name__}: {e})") from None
            fh.flush()
            os.fsync(fh.fileno())
        if n != f.size:
            got = f"more than {f.size} bytes" if n > f.size else f"{n} bytes"
            raise ValueError(f"{url}: {got}, expected {f.size} (not the pinned file: a wrong --base-url, or the "
                             "source changed)")
        if h.hexdigest() != f.sha256:
            raise ValueError(f"{url}: sha256 {h.hexdigest()} != pinned {f.sha256} (not the pinned file: a "
                             "wrong --base-url, or the source changed)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _atomic_write(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=f".{os.path.basename(path)}.",
                               suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
