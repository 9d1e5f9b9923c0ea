"""Counter-based randomness: per-id attributes computed from the id, never stored.

Every latent factor or attribute of a user / item / category is ``splitmix64(id, salt)``
turned into uniforms, so memory does not grow with the id space and any worker computes the
same value for the same id. Also here: Zipf ranks by inverse CDF and affine permutations of
``[0, n)`` that spread popular ranks over the id range.

Example::

    u = hash_uniform(np.arange(5, dtype=np.uint64), salt=7)  # 5 floats in [0, 1)
"""

from __future__ import annotations

import math

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_S11, _S16 = np.uint64(11), np.uint64(16)
_INV53 = 1.0 / float(1 << 53)
_INV16 = 1.0 / 65536.0


def salt_of(*parts: int) -> int:
    """A 64-bit salt from small integers (seed, domain code, purpose...)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix_int(h ^ (int(p) & 0xFFFFFFFFFFFFFFFF))
    return h


def _splitmix_int(z: int) -> int:
    m = 0xFFFFFFFFFFFFFFFF
    z = (z + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def splitmix64(x: np.ndarray, salt: int = 0) -> np.ndarray:
    """splitmix64 finaliser of ``x ^ salt`` (uint64 in, new uint64 array out)."""
    with np.errstate(over="ignore"):
        z = np.bitwise_xor(x.astype(np.uint64, copy=False), np.uint64(salt & 0xFFFFFFFFFFFFFFFF))
        z += _GOLDEN
        z ^= z >> _S30
        z *= _M1
        z ^= z >> _S27
        z *= _M2
        z ^= z >> _S31
    return z


def to_uniform(h: np.ndarray) -> np.ndarray:
    """uint64 hashes -> float64 uniforms in [0, 1) (53 bits)."""
    return (h >> _S11).astype(np.float64) * _INV53


def hash_uniform(x: np.ndarray, salt: int) -> np.ndarray:
    """One uniform in [0, 1) per element of ``x``."""
    return to_uniform(splitmix64(x, salt))


def hash_factors(x: np.ndarray, salt: int, k: int) -> np.ndarray:
    """``len(x) X k`` float32 factors with mean 0 and variance 1 (uniform on +-sqrt(3)).

    Four 16-bit lanes per 64-bit hash, so ``k`` factors cost ``ceil(k / 4)`` hashes.
    """
    x = x.astype(np.uint64, copy=False)
    n_hash = -(-k // 4)
    h = np.empty((len(x), n_hash), dtype=np.uint64)
    for j in range(n_hash):
        h[:, j] = splitmix64(x, (salt + j * 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF)
    # row i: hash 0's four lanes, then hash 1's...; one contiguous uint16 -> float32 pass
    out = h.view(np.uint16).reshape(len(x), n_hash * 4).astype(np.float32)
    out *= np.float32(_INV16 * 2 * math.sqrt(3.0))
    out -= np.float32(math.sqrt(3.0) * (1 - _INV16))
    return out[:, :k]


def zipf_rank(u: np.ndarray, n: int, s: float) -> np.ndarray:
    """Ranks in ``[0, n)`` with P(rank r) ~ (r + 1) ** -s, by inverse CDF of the continuous law.

    Args:
        u: uniforms in [0, 1).
        n: number of ranks.
        s: exponent >= 0 (0 = uniform).

    Returns:
        int64 ranks, same shape as ``u``.
    """
    if n <= 1:
        return np.zeros(u.shape, dtype=np.int64)
    if abs(s - 1.0) < 1e-9:
        x = np.exp(u * math.log(n + 1.0))
    else:
        a = 1.0 - s
        top = (n + 1.0) ** a - 1.0
        x = np.exp(np.log1p(u * top) * (1.0 / a))
    r = x.astype(np.int64)
    r -= 1
    np.clip(r, 0, n - 1, out=r)
    return r


ZIPF32_MAX_N = 1 << 22
"""Largest ``n`` :func:`zipf_rank32` serves (float32 resolves ranks to about 1e-6 relative)."""


def zipf_rank32(bits: np.ndarray, n: int, s: float) -> np.ndarray:
    """:func:`zipf_rank` in float32 from 32 random bits per draw, for ``n <= ZIPF32_MAX_N``.

    The same inverse CDF with ``u = bits / 2**32``; float32 ``log`` / ``exp`` are vectorised
    (AVX2) where float64 ``log1p`` is not: about 7x faster. A rank can differ from
    :func:`zipf_rank`'s by one where float32 rounding (~1e-6 relative on the continuous
    value) crosses a rank boundary, which leaves the law unchanged.

    Args:
        bits: uint32 random bits (e.g. the low half of a :func:`splitmix64` hash).
        n: number of ranks, ``<= ZIPF32_MAX_N``.
        s: exponent >= 0.

    Returns:
        int32 ranks in ``[0, n)``, same shape as ``bits``.
    """
    if n > ZIPF32_MAX_N:
        raise ValueError(f"zipf_rank32 serves n <= {ZIPF32_MAX_N}, got {n}; use zipf_rank")
    if n <= 1:
        return np.zeros(bits.shape, dtype=np.int32)
    x = bits.astype(np.float32)
    if abs(s - 1.0) < 1e-9:
        x *= np.float32(math.log(n + 1.0) / 4294967296.0)
    else:
        a = 1.0 - s
        x *= np.float32(((n + 1.0) ** a - 1.0) / 4294967296.0)
        x += np.float32(1.0)
        np.log(x, out=x)
        x *= np.float32(1.0 / a)
    np.exp(x, out=x)  # >= 1: the continuous rank + 1
    np.minimum(x, np.float32(n), out=x)
    r = x.astype(np.int32)
    r -= 1
    return r


def coprime_multiplier(n: int) -> int:
    """A multiplier near ``0.618 n`` coprime with ``n``: ``(a * r + b) % n`` permutes ``[0, n)``."""
    if n <= 2:
        return 1
    a = max(1, int(n * 0.6180339887))
    while math.gcd(a, n) != 1:
        a += 1
    return a


def permute(r: np.ndarray, n: int, a: int, b: int | np.ndarray) -> np.ndarray:
    """``(a * r + b) % n`` in int64 (exact while ``a * n < 2**63``)."""
    return (r * np.int64(a) + b) % np.int64(n)
