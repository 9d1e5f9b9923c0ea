"""The torch / fbgemm / torchrec guard.

These three are built against each other: a mismatched install fails deep inside fbgemm with
"undefined symbol". :func:`check_stack` turns that into one message naming what is installed and
the command that fixes it.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Callable, Optional

# (torch release, fbgemm release, torchrec release) combinations we have tested.
TESTED = {
    ("2.13.0", "1.8.0", "1.8.0"),
}

FIX_CPU = (
    "pip install torch==2.13.0 fbgemm-gpu-cpu==1.8.0 && pip install --no-deps torchrec==1.8.0"
)
FIX_GPU = (
    "pip install torch==2.13.0 fbgemm-gpu==1.8.0 --index-url https://download.pytorch.org/whl/cu126"
    " && pip install --no-deps torchrec==1.8.0"
)


class StackError(ImportError):
    """The installed torch / fbgemm / torchrec do not work together."""


def _release(version: Optional[str]) -> Optional[str]:
    # "2.13.0+cpu" -> "2.13.0"
    return version.split("+")[0] if version else None


def _dist_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def installed() -> dict[str, Optional[str]]:
    """Versions of the trio as the package metadata reports them (no import)."""
    fbgemm = _dist_version("fbgemm-gpu-cpu") or _dist_version("fbgemm-gpu")
    return {
        "torch": _dist_version("torch"),
        "fbgemm": fbgemm,
        "fbgemm_dist": "fbgemm-gpu-cpu" if _dist_version("fbgemm-gpu-cpu") else "fbgemm-gpu",
        "torchrec": _dist_version("torchrec"),
    }


def check_stack(
    versions: Optional[dict[str, Optional[str]]] = None,
    import_module: Callable[[str], object] = importlib.import_module,
) -> dict[str, Optional[str]]:
    """Raises :class:`StackError` unless torch, fbgemm and torchrec load and are a tested set.

    Args:
        versions: the installed versions (defaults to the package metadata); tests pass a fake.
        import_module: the importer (tests pass one that fails like a broken fbgemm).

    Returns:
        the versions found.
    """
    v = installed() if versions is None else versions
    found = (
        f"installed: torch {v.get('torch')}, {v.get('fbgemm_dist', 'fbgemm')} {v.get('fbgemm')}, "
        f"torchrec {v.get('torchrec')}"
    )
    fix = f"fix (CPU): {FIX_CPU}; fix (GPU): {FIX_GPU}"
    missing = [k for k in ("torch", "fbgemm", "torchrec") if not v.get(k)]
    if missing:
        raise StackError(f"cctl-rec needs torch, fbgemm and torchrec; missing {missing}; {found}; {fix}")
    combo = (_release(v["torch"]), _release(v["fbgemm"]), _release(v["torchrec"]))
    if combo not in TESTED:
        tested = ", ".join(f"torch {t} + fbgemm {f} + torchrec {r}" for t, f, r in sorted(TESTED))
        raise StackError(
            f"untested torch/fbgemm/torchrec combination ({found}); tested: {tested}; {fix}"
        )
    for mod in ("fbgemm_gpu", "torchrec"):
        try:
            import_module(mod)
        except Exception as e:  # OSError / ImportError("undefined symbol ...") / RuntimeError
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StackError(f"{mod} failed to load ({first}); {found}; {fix}") from e
    return v
