"""The four stages of a secure-aggregation round (see the package doc), as pure functions.

Sites are numbered 1..n by the coordinator for the round (the Shamir points). A site's secrets for the
round (:class:`SiteSecrets`) live in its memory from stage 1 to stage 4 and are never written anywhere.
Every ciphertext between two sites is bound to the round, the sender and the receiver (the AEAD's
associated data), so the coordinator can neither read a share nor move it to another site or round.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import struct
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from privacy.secagg import shamir
from privacy.secagg.fixed_point import add, subtract
from privacy.secagg.masks import SEED_BYTES, derive, prg

KEY_BYTES = 32
NONCE_BYTES = 12


class SecAggError(ValueError):
    """A stage that cannot go on; the message says why (a malformed or forged message, too few sites)."""


@dataclasses.dataclass(frozen=True)
class Advert:
    """A site's public keys for one round: ``c`` for the channel between sites, ``s`` for the masks."""

    c_public: bytes
    s_public: bytes


@dataclasses.dataclass
class SiteSecrets:
    """What a site holds in memory for one round."""

    round_tag: bytes
    me: int
    c_private: bytes
    s_private: bytes
    self_seed: bytes = b""
    roster: dict[int, Advert] = dataclasses.field(default_factory=dict)
    threshold: int = 0
    received: dict[int, tuple[bytes, bytes]] = dataclasses.field(default_factory=dict)  # v → (share of b_v, of s_v)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _raw_public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def public_of(private: bytes) -> bytes:
    return _raw_public(X25519PrivateKey.from_private_bytes(private))


def _agree(private: bytes, public: bytes, info: bytes) -> bytes:
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as err:  # a low-order or malformed public key
        raise SecAggError(f"a public key that cannot be used: {err}") from None
    return derive(shared, info=info)


# --- stage 1: keys --------------------------------------------------------------------------------

def advertise(*, round_tag: bytes, me: int) -> tuple[SiteSecrets, Advert]:
    """A site's fresh key pairs for the round ``round_tag`` (a run and round identifier)."""
    c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    secrets = SiteSecrets(round_tag=round_tag, me=me, c_private=_raw_private(c), s_private=_raw_private(s))
    return secrets, Advert(c_public=_raw_public(c), s_public=_raw_public(s))


def check_roster(roster: Mapping[int, Advert], *, threshold: int) -> None:
    """The coordinator's and every site's check of the roster it is given."""
    if len(roster) < 2:
        raise SecAggError(f"secure aggregation needs at least 2 sites, the roster has {len(roster)}")
    if not 2 <= threshold <= len(roster):
        raise SecAggError(f"threshold must lie in 2..{len(roster)} (the roster), got {threshold}")
    keys = [a.c_public for a in roster.values()] + [a.s_public for a in roster.values()]
    if len(set(keys)) != len(keys) or any(len(k) != KEY_BYTES for k in keys):
        raise SecAggError("the roster repeats a public key or holds a malformed one")


# --- stage 2: shares ------------------------------------------------------------------------------

def _channel(secrets: SiteSecrets, peer: int) -> ChaCha20Poly1305:
    return ChaCha20Poly1305(_agree(secrets.c_private, secrets.roster[peer].c_public,
                                   b"fedpeft secagg channel " + secrets.round_tag))


def _binding(round_tag: bytes, sender: int, receiver: int) -> bytes:
    return round_tag + struct.pack(">II", sender, receiver)


def commitment(seed: bytes, round_tag: bytes) -> bytes:
    """SHA-256 of a self-mask seed for the round: sent in the clear with the shares (a hash of 256 random bits
    tells nothing), so that the coordinator notices shares that do not rebuild the seed."""
    return hashlib.sha256(b"fedpeft secagg self seed " + round_tag + seed).digest()


def share(secrets: SiteSecrets, roster: Mapping[int, Advert], *, threshold: int) -> tuple[dict[int, bytes], bytes]:
    """Stage 2 at a site: draw the self-mask seed and send every other site its encrypted shares of that seed
    and of this site's mask key (receiver → ciphertext), with the seed's :func:`commitment`."""
    check_roster(roster, threshold=threshold)
    if secrets.me not in roster or roster[secrets.me].s_public != public_of(secrets.s_private):
        raise SecAggError("the roster does not hold this site's own keys")
    secrets.roster, secrets.threshold = dict(roster), threshold
    secrets.self_seed = os.urandom(SEED_BYTES)
    points = sorted(roster)
    b_shares = shamir.split(secrets.self_seed, xs=points, threshold=threshold)
    s_shares = shamir.split(secrets.s_private, xs=points, threshold=threshold)
    secrets.received[secrets.me] = (b_shares[secrets.me], s_shares[secrets.me])  # its own, kept
    out = {}
    for v in points:
        if v == secrets.me:
            continue
        nonce = os.urandom(NONCE_BYTES)
        binding = _binding(secrets.round_tag, secrets.me, v)
        out[v] = nonce + _channel(secrets, v).encrypt(nonce, b_shares[v] + s_shares[v], binding)
    return out, commitment(secrets.self_seed, secrets.round_tag)


def receive_shares(secrets: SiteSecrets, ciphertexts: Mapping[int, bytes]) -> None:
    """Stage 2's end at a site: decrypt the shares the other sites sent it (sender → ciphertext)."""
    for u, blob in ciphertexts.items():
        if u == secrets.me or u not in secrets.roster:
            raise SecAggError(f"shares from site {u}, which is not another site of the roster")
        try:
            plain = _channel(secrets, u).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:],
                                                 _binding(secrets.round_tag, u, secrets.me))
        except InvalidTag:
            raise SecAggError(f"the shares from site {u} do not authenticate (forged, or meant for another "
                              "site or round)") from None
        if len(plain) != 2 * shamir.SHARE_BYTES:
            raise SecAggError(f"the shares from site {u} are malformed")
        secrets.received[u] = (plain[: shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])


# --- stage 3: masked input ------------------------------------------------------------------------

def _pair_seed(private: bytes, public: bytes, round_tag: bytes) -> bytes:
    return _agree(private, public, b"fedpeft secagg pair mask " + round_tag)


def _self_seed(seed: bytes, round_tag: bytes) -> bytes:
    return derive(seed, info=b"fedpeft secagg self mask " + round_tag)


def mask(secrets: SiteSecrets, vector: np.ndarray, *, ring: int, shared_with: Iterable[int]) -> np.ndarray:
    """Stage 3 at a site: ``vector`` (uint64 elements of ℤ/2^ring) plus its self mask and the pair masks with
    every site in ``shared_with`` (those whose shares reached it: the coordinator says which)."""
    peers = sorted(set(shared_with) - {secrets.me})
    if any(v not in secrets.roster for v in peers):
        raise SecAggError("a site to mask with is not on the roster")
    if len(peers) + 1 < secrets.threshold:
        raise SecAggError(f"{len(peers) + 1} sites left, fewer than the threshold {secrets.threshold}")
    size = int(np.asarray(vector).size)
    out = add(vector, prg(_self_seed(secrets.self_seed, secrets.round_tag), size, bits=ring), ring=ring)
    for v in peers:
        pair = prg(_pair_seed(secrets.s_private, secrets.roster[v].s_public, secrets.round_tag), size, bits=ring)
        out = add(out, pair, ring=ring) if secrets.me < v else subtract(out, pair, ring=ring)
    return out


# --- stage 4: unmasking ---------------------------------------------------------------------------

def reveal(secrets: SiteSecrets, *, survivors: Iterable[int], dropped: Iterable[int]) -> dict[int, tuple[str, bytes]]:
    """Stage 4 at a site: its share of ``b_v`` for each survivor ``v`` and of ``s_v`` for each dropped ``v``
    (site → (``"b"`` or ``"s"``, share)). A site named in both, or the site itself as dropped, is refused:
    both shares of one site would unmask its input."""
    survivors, dropped = set(survivors), set(dropped)
    if survivors & dropped:
        raise SecAggError(f"sites {sorted(survivors & dropped)} are named both as survivors and as dropped")
    if secrets.me in dropped or secrets.me not in survivors:
        raise SecAggError("this site is named as dropped")
    if len(survivors) < secrets.threshold:
        raise SecAggError(f"{len(survivors)} survivors, fewer than the threshold {secrets.threshold}")
    if not (survivors | dropped) <= set(secrets.received):
        raise SecAggError("asked for shares this site never received")
    return {**{v: ("b", secrets.received[v][0]) for v in survivors},
            **{v: ("s", secrets.received[v][1]) for v in dropped}}


def unmask(masked: Mapping[int, np.ndarray], revealed: Mapping[int, Mapping[int, tuple[str, bytes]]], *,
           roster: Mapping[int, Advert], commitments: Mapping[int, bytes], threshold: int, round_tag: bytes,
           ring: int) -> np.ndarray:
    """Stage 4 at the coordinator: the sum of the survivors' vectors (ℤ/2^ring).

    ``masked``: survivor → its masked vector; ``revealed``: revealing site → its :func:`reveal` answer;
    ``commitments``: the stage-2 commitment of every site whose shares went out (those every survivor
    masked with). A seed or key the shares do not rebuild is refused, naming the site."""
    shared = set(commitments)
    survivors = sorted(masked)
    if not set(survivors) <= shared:
        raise SecAggError("a masked vector from a site whose shares never went out")
    dropped = sorted(shared - set(survivors))
    if len(revealed) < threshold:
        raise SecAggError(f"{len(revealed)} sites revealed shares, {threshold} needed")
    total = None
    for vector in masked.values():
        total = vector if total is None else add(total, vector, ring=ring)
    size = int(np.asarray(total).size)

    def shares_of(v: int, kind: str) -> dict[int, bytes]:
        got = {w: answer[v][1] for w, answer in revealed.items() if v in answer and answer[v][0] == kind}
        if len(got) < threshold:
            raise SecAggError(f"{len(got)} shares of site {v}'s {kind} secret, {threshold} needed")
        return got

    for u in survivors:  # its self mask
        try:
            seed = shamir.combine(shares_of(u, "b"), threshold=threshold, length=SEED_BYTES)
        except ValueError:
            seed = b""
        if commitment(seed, round_tag) != commitments[u]:
            raise SecAggError(f"the shares of site {u}'s self-mask seed do not rebuild it (a forged share)")
        total = subtract(total, prg(_self_seed(seed, round_tag), size, bits=ring), ring=ring)
    for v in dropped:  # the pair masks the survivors added against it
        try:
            s_private = shamir.combine(shares_of(v, "s"), threshold=threshold, length=KEY_BYTES)
        except ValueError:
            s_private = b""
        if len(s_private) != KEY_BYTES or public_of(s_private) != roster[v].s_public:
            raise SecAggError(f"the shares of site {v}'s mask key do not rebuild it (a forged share)")
        for u in survivors:
            pair = prg(_pair_seed(s_private, roster[u].s_public, round_tag), size, bits=ring)
            total = subtract(total, pair, ring=ring) if u < v else add(total, pair, ring=ring)
    return total
