"""Shamir secret sharing over the prime field p = 2^521 − 1 (a Mersenne prime): a secret of up to 64
bytes is the constant term of a random polynomial of degree ``threshold − 1``; share ``i`` is its value
at ``x = i`` (sites are numbered from 1). Any ``threshold`` shares give the secret back (Lagrange
interpolation at 0); fewer tell nothing about it."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

P = (1 << 521) - 1
SHARE_BYTES = 66  # 521 bits
MAX_SECRET_BYTES = 64


def split(secret: bytes, *, xs: list[int], threshold: int) -> dict[int, bytes]:
    """Shares of ``secret`` for the points ``xs`` (distinct, 1 <= x < p), any ``threshold`` of which rebuild it."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must lie in 1..{len(xs)} (the shares), got {threshold}")
    if len(secret) > MAX_SECRET_BYTES:
        raise ValueError(f"a secret of at most {MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(xs)) != len(xs) or not all(0 < x < P for x in xs):
        raise ValueError("share points must be distinct and in 1..p-1")
    coefficients = [int.from_bytes(secret, "big"), *(secrets.randbelow(P) for _ in range(threshold - 1))]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine(shares: Mapping[int, bytes], *, threshold: int, length: int) -> bytes:
    """The secret of ``length`` bytes from ``threshold`` or more shares (point → share)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, {threshold} needed")
    points = [(x, int.from_bytes(y, "big")) for x, y in sorted(shares.items())[:threshold]]
    if any(len(y) != SHARE_BYTES for y in shares.values()) or any(y >= P for _, y in points):
        raise ValueError("a malformed share")
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (-xj) % P
                den = den * (xi - xj) % P
        secret = (secret + yi * num * pow(den, -1, P)) % P
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not combine to a secret of that length (wrong or tampered shares)")
    return secret.to_bytes(length, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):
        y = (y * x + c) % P
    return y
