"""The mask generator: ChaCha20 keyed with a full 256-bit seed, its keystream read as little-endian
uint64 words reduced to the ring ℤ/2^k. Seeds come from HKDF-SHA256 (:func:`derive`), so one shared
secret gives independent masks for each purpose and round."""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

SEED_BYTES = 32
_NONCE = bytes(16)  # each seed keys one stream: the nonce (and counter) can be fixed


def derive(secret: bytes, *, info: bytes, length: int = SEED_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` for the purpose ``info`` (no salt: ``secret`` is a fresh X25519 output or seed)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def ring_mask(bits: int) -> np.uint64:
    if not 1 <= bits <= 64:
        raise ValueError(f"ring bits must lie in 1..64, got {bits}")
    return np.uint64((1 << bits) - 1)


def prg(seed: bytes, size: int, *, bits: int) -> np.ndarray:
    """``size`` uniform elements of ℤ/2^bits (uint64) from the 256-bit ``seed``."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed has {SEED_BYTES} bytes, got {len(seed)}")
    stream = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor().update(bytes(8 * size))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64) & ring_mask(bits)
