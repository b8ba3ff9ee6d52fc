"""Seeded client sampling over stable site keys."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.sampling import sample_count, sample_sites


@pytest.mark.parametrize(
    ("n", "fraction", "expected"),
    [
        (10, 0.5, 5),
        (10, 1.0, 10),
        (10, 0.01, 1),  # at least one
        (10, 0.19, 1),
        (10, 0.99, 9),  # floor
        (3, 0.5, 1),
        (1, 0.5, 1),
        (0, 0.5, 0),  # never more than there are
        (10, 0.3, 3),  # 10 * 0.3 = 2.9999999999999996 in floats
        (10, 0.7, 7),
        (100, 0.29, 29),  # 100 * 0.29 = 28.999999999999996
        (7, 1.0, 7),
    ],
)
def test_sample_count(n: int, fraction: float, expected: int) -> None:
    assert sample_count(n, fraction) == expected


def test_sample_count_minimum() -> None:
    assert sample_count(10, 0.05, minimum=3) == 3
    assert sample_count(2, 0.05, minimum=3) == 2
    assert sample_count(10, 0.05, minimum=0) == 0


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 500), num=st.integers(1, 100), den=st.integers(1, 100))
def test_sample_count_matches_exact_rational_floor(n: int, num: int, den: int) -> None:
    fraction = min(num, den) / den
    exact = (n * min(num, den)) // den  # floor of n * fraction in exact arithmetic
    assert sample_count(n, fraction) == min(n, max(1, exact))


SITES = [f"site-{i}" for i in range(20)]


def test_deterministic_for_seed_and_round() -> None:
    assert sample_sites(SITES, 0.3, seed=1, server_round=4) == sample_sites(SITES, 0.3, seed=1, server_round=4)


def test_varies_across_rounds_and_seeds() -> None:
    by_round = {tuple(sample_sites(SITES, 0.3, seed=1, server_round=r)) for r in range(1, 11)}
    by_seed = {tuple(sample_sites(SITES, 0.3, seed=s, server_round=1)) for s in range(10)}
    assert len(by_round) > 5
    assert len(by_seed) > 5


@settings(max_examples=50, deadline=None)
@given(
    sites=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30, unique=True),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
    server_round=st.integers(0, 1000),
)
def test_sorted_subset_of_sample_count(sites: list[str], fraction: float, seed: int, server_round: int) -> None:
    chosen = sample_sites(sites, fraction, seed=seed, server_round=server_round)
    assert len(chosen) == sample_count(len(sites), fraction)
    assert chosen == sorted(chosen)
    assert len(set(chosen)) == len(chosen)
    assert set(chosen) <= set(sites)


@settings(max_examples=50, deadline=None)
@given(
    sites=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=30, unique=True),
    fraction=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_input_order_does_not_matter(sites: list[str], fraction: float, seed: int, data: st.DataObject) -> None:
    shuffled = data.draw(st.permutations(sites))
    assert sample_sites(sites, fraction, seed=seed, server_round=3) == sample_sites(
        shuffled, fraction, seed=seed, server_round=3
    )


@pytest.mark.parametrize("seed", [0, 1, 123])
def test_fraction_one_returns_all_sorted(seed: int) -> None:
    assert sample_sites(["c", "a", "b"], 1.0, seed=seed, server_round=seed) == ["a", "b", "c"]
    assert sample_sites(list(reversed(SITES)), 1.0, seed=seed, server_round=2) == sorted(SITES)


def test_every_site_is_sampled_eventually_and_roughly_uniformly() -> None:
    counts = dict.fromkeys(SITES, 0)
    rounds = 400
    for r in range(rounds):
        for site in sample_sites(SITES, 0.25, seed=0, server_round=r):
            counts[site] += 1
    expected = rounds * 5 / 20
    # binomial sd = sqrt(400 * 0.25 * 0.75) ≈ 8.7; 5 sd is a generous band
    assert all(abs(c - expected) < 5 * math.sqrt(rounds * 0.25 * 0.75) for c in counts.values())
