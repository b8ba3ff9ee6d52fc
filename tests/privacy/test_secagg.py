"""Secure aggregation's protocol (privacy/secagg): Shamir sharing, the mask generator, fixed point, and
whole rounds with and without dropouts, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg import fixed_point, shamir
from privacy.secagg.masks import prg
from privacy.secagg.protocol import (
    Advert,
    SecAggError,
    advertise,
    mask,
    receive_shares,
    reveal,
    share,
    unmask,
)

TAG = b"run-1/round-3"


# --- Shamir -----------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), n=st.integers(2, 9), data=st.data())
def test_any_threshold_shares_rebuild_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(1, n))
    shares = shamir.split(secret, xs=list(range(1, n + 1)), threshold=threshold)
    chosen = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=threshold, max_size=n, unique=True))
    assert shamir.combine({x: shares[x] for x in chosen}, threshold=threshold, length=len(secret)) == secret


def test_fewer_shares_than_the_threshold_are_refused_and_a_wrong_share_is_noticed() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, xs=[1, 2, 3, 4, 5], threshold=3)
    with pytest.raises(ValueError, match="2 shares, 3 needed"):
        shamir.combine({1: shares[1], 2: shares[2]}, threshold=3, length=32)
    forged = {**shares, 2: shamir.split(b"\xff" * 32, xs=[2], threshold=1)[2]}  # another split's share
    with pytest.raises(ValueError, match="wrong or tampered"):
        shamir.combine({x: forged[x] for x in (1, 2, 3)}, threshold=3, length=32)


def test_threshold_minus_one_shares_say_nothing_each_secret_fits_them() -> None:
    """With t-1 shares fixed, every candidate secret has a polynomial through them: the shares are equally
    consistent with any secret (checked by building one for a second secret)."""
    xs, t = [1, 2, 3], 3
    shares = shamir.split(b"\x01" * 32, xs=xs, threshold=t)
    known = {x: int.from_bytes(shares[x], "big") for x in (1, 2)}
    other = int.from_bytes(b"\x02" * 32, "big")
    # a degree-2 polynomial through (0, other), (1, y1), (2, y2) exists over the field
    points = [(0, other), *known.items()]
    y3 = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num, den = num * (3 - xj) % shamir.P, den * (xi - xj) % shamir.P
        y3 = (y3 + yi * num * pow(den, -1, shamir.P)) % shamir.P
    rebuilt = shamir.combine({1: shares[1], 2: shares[2], 3: y3.to_bytes(shamir.SHARE_BYTES, "big")}, threshold=t,
                             length=32)
    assert rebuilt == b"\x02" * 32


# --- masks and fixed point --------------------------------------------------------------------------

def test_the_mask_generator_uses_the_whole_seed() -> None:
    seed = bytes(32)
    base = prg(seed, 64, bits=64)
    for byte in (0, 17, 31):  # a change anywhere in the 256-bit seed gives another stream
        other = bytearray(seed)
        other[byte] ^= 0x80
        assert not np.array_equal(prg(bytes(other), 64, bits=64), base)
    assert np.array_equal(prg(seed, 64, bits=64), base)  # and the same seed the same stream
    assert prg(seed, 1000, bits=20).max() < 2**20
    with pytest.raises(ValueError, match="32 bytes"):
        prg(b"\x00" * 4, 8, bits=32)


@settings(max_examples=50, deadline=None)
@given(sites=st.lists(st.tuples(st.lists(st.floats(-3, 3), min_size=5, max_size=5), st.integers(0, 500)),
                      min_size=1, max_size=8),
       bits=st.integers(4, 24))
def test_the_ring_sum_decodes_to_the_weighted_sum_within_half_a_step_each(sites: list, bits: int) -> None:
    clip = 2.0
    total_weight = sum(w for _, w in sites) or 1
    ring = fixed_point.ring_bits(bits, total_weight)
    total = np.zeros(5, np.uint64)
    for values, weight in sites:
        total = fixed_point.add(total, fixed_point.encode(np.array(values), clip=clip, bits=bits, weight=weight,
                                                          ring=ring), ring=ring)
    expected = sum(w * np.clip(np.array(v), -clip, clip) for v, w in sites)
    got = fixed_point.decode(total, clip=clip, bits=bits, ring=ring)
    assert np.all(np.abs(got - expected) <= total_weight * fixed_point.step(clip, bits) / 2 + 1e-9)


@settings(max_examples=50, deadline=None)
@given(ring=st.integers(1, 64), seed=st.integers(0, 2**32 - 1), size=st.integers(0, 40))
def test_packed_ring_elements_come_back_exactly_in_their_bytes(ring: int, seed: int, size: int) -> None:
    values = prg(seed.to_bytes(32, "little"), size, bits=ring)
    packed = fixed_point.pack(values, ring)
    assert packed.dtype == np.uint8 and packed.size == size * ((ring + 7) // 8)
    np.testing.assert_array_equal(fixed_point.unpack(packed, ring), values)


def test_a_packed_vector_of_broken_length_is_refused() -> None:
    with pytest.raises(ValueError, match="5-byte ring elements"):
        fixed_point.unpack(np.zeros(7, np.uint8), 40)
    with pytest.raises(ValueError, match="5-byte ring elements"):
        fixed_point.unpack(np.zeros(5, np.uint64), 40)


def test_a_ring_too_wide_for_64_bits_is_refused() -> None:
    assert fixed_point.ring_bits(16, 1000) == 26  # 2·1000·32767 < 2^26
    with pytest.raises(ValueError, match="needs a 72-bit ring"):
        fixed_point.ring_bits(32, 2**40)


# --- whole rounds -------------------------------------------------------------------------------------

def round_(values: dict[int, np.ndarray], *, threshold: int, drop_before_shares: set[int] = frozenset(),
           drop_after_shares: set[int] = frozenset(), drop_before_reveal: set[int] = frozenset(), ring: int = 40,
           forge: object = lambda answer: answer) -> tuple[np.ndarray, dict]:
    """One round through the four stages, the coordinator's routing included."""
    secrets, roster = {}, {}
    for u in values:
        secrets[u], roster[u] = advertise(round_tag=TAG, me=u)
    outs = {u: share(secrets[u], roster, threshold=threshold) for u in values if u not in drop_before_shares}
    sent, commitments = {u: o[0] for u, o in outs.items()}, {u: o[1] for u, o in outs.items()}
    shared = set(sent)
    for v in shared:  # the coordinator routes each site's ciphertexts to it
        receive_shares(secrets[v], {u: out[v] for u, out in sent.items() if u != v})
    masked = {u: mask(secrets[u], values[u], ring=ring, shared_with=shared) for u in shared
              if u not in drop_after_shares}
    survivors = set(masked)
    revealed = {u: reveal(secrets[u], survivors=survivors, dropped=shared - survivors) for u in survivors
                if u not in drop_before_reveal}  # a survivor gone before revealing: its input still counts
    revealed = {u: forge(answer) for u, answer in revealed.items()}
    total = unmask(masked, revealed, roster=roster, commitments=commitments, threshold=threshold, round_tag=TAG,
                   ring=ring)
    return total, {"masked": masked, "secrets": secrets, "roster": roster}


def vectors(n: int, size: int = 50, ring: int = 40, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 2**30, size=size).astype(np.uint64) for u in range(1, n + 1)}


def ring_sum(vs: list[np.ndarray], ring: int = 40) -> np.ndarray:
    total = np.zeros_like(vs[0])
    for v in vs:
        total = fixed_point.add(total, v, ring=ring)
    return total


def test_the_coordinator_gets_the_sum_and_each_masked_vector_looks_uniform() -> None:
    values = vectors(5)
    total, seen = round_(values, threshold=3)
    assert np.array_equal(total, ring_sum(list(values.values())))
    for u, masked in seen["masked"].items():
        assert not np.array_equal(masked, values[u])
        assert np.mean(masked < 2**30) < 0.05  # the inputs lie below 2^30 of a 2^40 ring; masked ones do not


@pytest.mark.parametrize("dropped", [{2}, {1, 5}])
def test_sites_that_drop_after_sharing_leave_the_sum_of_the_others(dropped: set[int]) -> None:
    values = vectors(5, seed=1)
    total, _ = round_(values, threshold=3, drop_after_shares=dropped)
    assert np.array_equal(total, ring_sum([v for u, v in values.items() if u not in dropped]))


def test_a_site_that_drops_before_sharing_is_left_out_of_every_mask() -> None:
    values = vectors(4, seed=2)
    total, _ = round_(values, threshold=2, drop_before_shares={3})
    assert np.array_equal(total, ring_sum([v for u, v in values.items() if u != 3]))


@pytest.mark.parametrize("dropped", [set(), {2}])
def test_a_forged_share_is_refused_naming_the_site(dropped: set[int]) -> None:
    """A share shifted by one (an offset a malicious site could choose) rebuilds another secret: the seed's
    commitment, or the mask key's public key, catches it."""
    def shifted(answer: dict) -> dict:
        kind, share_ = answer[2]
        return {**answer, 2: (kind, (int.from_bytes(share_, "big") + 1).to_bytes(shamir.SHARE_BYTES, "big"))}

    with pytest.raises(SecAggError, match="site 2's (self-mask seed|mask key) do not rebuild"):
        round_(vectors(4), threshold=4 - len(dropped), drop_after_shares=dropped, forge=shifted)


def test_too_many_dropouts_are_refused() -> None:
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        round_(vectors(4), threshold=3, drop_after_shares={1, 2})


def test_a_site_never_reveals_both_secrets_of_one_site() -> None:
    values = vectors(3)
    secrets, roster = {}, {}
    for u in values:
        secrets[u], roster[u] = advertise(round_tag=TAG, me=u)
    sent = {u: share(secrets[u], roster, threshold=2)[0] for u in values}
    for v in values:
        receive_shares(secrets[v], {u: out[v] for u, out in sent.items() if u != v})
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        reveal(secrets[1], survivors={1, 2}, dropped={2})
    with pytest.raises(SecAggError, match="named as dropped"):
        reveal(secrets[1], survivors={2, 3}, dropped={1})


def test_a_share_moved_to_another_site_or_round_does_not_decrypt() -> None:
    secrets, roster = {}, {}
    for u in (1, 2, 3):
        secrets[u], roster[u] = advertise(round_tag=TAG, me=u)
    sent = {u: share(secrets[u], roster, threshold=2)[0] for u in (1, 2, 3)}
    with pytest.raises(SecAggError, match="do not authenticate"):
        receive_shares(secrets[3], {1: sent[1][2]})  # site 2's share handed to site 3
    secrets[2].round_tag = b"run-1/round-4"
    with pytest.raises(SecAggError, match="do not authenticate"):
        receive_shares(secrets[2], {1: sent[1][2]})


def test_a_roster_without_the_sites_own_keys_or_with_repeated_keys_is_refused() -> None:
    mine, _ = advertise(round_tag=TAG, me=1)
    others = {u: advertise(round_tag=TAG, me=u)[1] for u in (1, 2, 3)}
    with pytest.raises(SecAggError, match="own keys"):
        share(mine, others, threshold=2)
    twice = {1: others[1], 2: others[1], 3: others[3]}
    with pytest.raises(SecAggError, match="repeats a public key"):
        share(mine, twice, threshold=2)
    with pytest.raises(SecAggError, match="threshold must lie in 2..3"):
        share(mine, {1: Advert(b"a" * 32, b"b" * 32), 2: others[2], 3: others[3]}, threshold=4)


# --- the generator against a known answer, the masked vector against uniformity ---------------------------

def test_the_generator_is_chacha20_by_its_known_answer() -> None:
    """ChaCha20 with the all-zero key and nonce (RFC 7539 §2.3.2's cipher, Bernstein's test vector): the first
    keystream words read as little-endian uint64."""
    words = prg(bytes(32), 4, bits=64)
    stream = bytes.fromhex("76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7")
    assert words.tobytes() == stream


def test_a_masked_vector_passes_a_uniformity_test() -> None:
    """A constant input, masked, is uniform over the ring: its top byte falls into 256 bins evenly (chi-square,
    255 degrees of freedom, below 330.5, the critical value at p = 0.001)."""
    values = {u: np.full(40_000, 7, np.uint64) for u in range(1, 4)}
    _, seen = round_(values, threshold=2)
    top = (seen["masked"][1] >> np.uint64(32)).astype(np.int64) & 0xFF  # bits 32-39 of the 40-bit ring
    counts = np.bincount(top, minlength=256)
    expected = counts.sum() / 256
    assert float(((counts - expected) ** 2 / expected).sum()) < 330.5
    assert not np.array_equal(seen["masked"][1], values[1])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 7), size=st.integers(1, 40), seed=st.integers(0, 2**31), data=st.data())
def test_the_unmasked_sum_is_the_sum_of_the_survivors_whoever_drops_when(n: int, size: int, seed: int,
                                                                          data: st.DataObject) -> None:
    """Sites drop before sharing, after sharing, or (survivors) before revealing; as long as the threshold
    remains at each stage, the sum is the survivors' exactly."""
    threshold = data.draw(st.integers(2, n))
    sites = list(range(1, n + 1))
    before = set(data.draw(st.lists(st.sampled_from(sites), max_size=n - threshold, unique=True)))
    left = [u for u in sites if u not in before]
    after = set(data.draw(st.lists(st.sampled_from(left), max_size=len(left) - threshold, unique=True)))
    survivors = [u for u in left if u not in after]
    silent = set(data.draw(st.lists(st.sampled_from(survivors), max_size=len(survivors) - threshold, unique=True)))
    values = vectors(n, size=size, seed=seed)
    total, _ = round_(values, threshold=threshold, drop_before_shares=before, drop_after_shares=after,
                      drop_before_reveal=silent)
    assert np.array_equal(total, ring_sum([v for u, v in values.items() if u not in before | after]))


def test_a_coordinator_that_calls_a_live_site_dropped_cannot_unmask_it() -> None:
    """Site 2 sent its masked input; the coordinator tells the others it dropped. They reveal its mask key
    (the pair masks come off) but, naming it dropped, no share of its self-mask seed: its vector stays masked."""
    values = vectors(4, seed=3)
    secrets, roster = {}, {}
    for u in values:
        secrets[u], roster[u] = advertise(round_tag=TAG, me=u)
    outs = {u: share(secrets[u], roster, threshold=3) for u in values}
    for v in values:
        receive_shares(secrets[v], {u: out[0][v] for u, out in outs.items() if u != v})
    masked = {u: mask(secrets[u], values[u], ring=40, shared_with=values) for u in values}
    lie = {u: reveal(secrets[u], survivors={1, 3, 4}, dropped={2}) for u in (1, 3, 4)}
    assert all(answer[2][0] == "s" for answer in lie.values())  # no "b" share of site 2 anywhere
    # the best the coordinator can do: strip site 2's pair masks with the revealed key; its self mask stays
    from privacy.secagg import shamir
    from privacy.secagg.protocol import _pair_seed

    s2 = shamir.combine({u: answer[2][1] for u, answer in lie.items()}, threshold=3, length=32)
    stripped = masked[2]
    for u in (1, 3, 4):
        pair = prg(_pair_seed(s2, roster[u].s_public, TAG), 50, bits=40)
        stripped = fixed_point.subtract(stripped, pair, ring=40) if 2 < u else fixed_point.add(stripped, pair, ring=40)
    assert not np.array_equal(stripped, values[2])
    assert np.mean(stripped < 2**30) < 0.2  # still uniform over the 2^40 ring, the input lay below 2^30
    with pytest.raises(SecAggError, match="both as survivors and as dropped"):
        reveal(secrets[1], survivors={1, 2, 3}, dropped={2})  # asking for both kinds is refused
