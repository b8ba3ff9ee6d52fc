"""Client partitions: spec parsing, and iid / dirichlet / natural partitions of a labelled table."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedpeft.data import LabelledTable, parse_partition_spec, partition_indices
from fedpeft.data.partition import PartitionSpec, natural_client_count
from fedpeft.errors import FedPeftError


def _table(n: int, *, classes: int = 2, seed: int = 0, sites: list[str] | None = None) -> LabelledTable:
    labels = np.random.default_rng(seed).integers(0, classes, n).astype(np.int64)
    data = {"text": [f"row {i}" for i in range(n)], "label": labels.astype(str)}
    if sites is not None:
        data["site"] = sites
    frame = pd.DataFrame(data)
    return LabelledTable(frame=frame, texts=list(frame["text"]), labels=labels,
                         label_names=tuple(str(c) for c in range(classes)))


def _partition(table: LabelledTable, spec: str, *, num_clients: int, seed: int) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # flwr-datasets warns when it redraws Dirichlet shares
        return partition_indices(table, spec, num_clients=num_clients, seed=seed)


def _assert_disjoint_cover(parts: list[np.ndarray], n: int, num_clients: int) -> None:
    assert len(parts) == num_clients
    assert all(len(p) > 0 for p in parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert all((np.diff(p) > 0).all() for p in parts)  # sorted, no duplicates within a part
    joined = np.concatenate(parts)
    assert len(joined) == n  # disjoint: no row twice
    assert np.array_equal(np.sort(joined), np.arange(n))  # cover: every row once


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("iid", PartitionSpec("iid")),
        (" iid ", PartitionSpec("iid")),
        ("dirichlet:0.5", PartitionSpec("dirichlet", alpha=0.5)),
        ("dirichlet:10", PartitionSpec("dirichlet", alpha=10.0)),
        ("natural:col", PartitionSpec("natural", column="col")),
        ("natural:site_id", PartitionSpec("natural", column="site_id")),
    ],
)
def test_parse_valid(spec: str, expected: PartitionSpec) -> None:
    assert parse_partition_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("foo", "unknown partition spec"),
        ("", "unknown partition spec"),
        ("iid:3", "unknown partition spec"),
        ("natural:", "unknown partition spec"),
        ("natural", "unknown partition spec"),
        ("dirichlet:-1", "positive alpha"),
        ("dirichlet:0", "positive alpha"),
        ("dirichlet:x", "positive alpha"),
        ("dirichlet:", "positive alpha"),
        ("dirichlet:nan", "positive alpha"),
    ],
)
def test_parse_invalid(spec: str, match: str) -> None:
    with pytest.raises(FedPeftError, match=match):
        parse_partition_spec(spec)


# --- iid and dirichlet --------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "dirichlet:5"])
@pytest.mark.parametrize("num_clients", [1, 3, 7])
def test_disjoint_and_cover(spec: str, num_clients: int) -> None:
    table = _table(240, seed=num_clients)
    _assert_disjoint_cover(_partition(table, spec, num_clients=num_clients, seed=1), len(table), num_clients)


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5"])
def test_deterministic_for_seed(spec: str) -> None:
    table = _table(200)
    a = _partition(table, spec, num_clients=4, seed=7)
    b = _partition(table, spec, num_clients=4, seed=7)
    c = _partition(table, spec, num_clients=4, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_shares_are_equal_and_random() -> None:
    table = _table(200)
    parts = _partition(table, "iid", num_clients=4, seed=0)
    assert [len(p) for p in parts] == [50, 50, 50, 50]
    assert not np.array_equal(parts[0], np.arange(50))  # shuffled, not contiguous blocks


@settings(max_examples=25, deadline=None)
@given(n=st.integers(10, 120), num_clients=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_iid_property(n: int, num_clients: int, seed: int) -> None:
    table = _table(n, seed=seed % 1000)
    parts = _partition(table, "iid", num_clients=num_clients, seed=seed)
    _assert_disjoint_cover(parts, n, num_clients)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def _label_skew(table: LabelledTable, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    k = len(table.label_names)
    overall = np.bincount(table.labels, minlength=k) / len(table)
    return float(np.mean([0.5 * np.abs(np.bincount(table.labels[p], minlength=k) / len(p) - overall).sum()
                          for p in parts]))


def test_small_alpha_dirichlet_is_label_skewed() -> None:
    table = _table(300)
    seeds = [0, 2, 3]
    iid = np.mean([_label_skew(table, _partition(table, "iid", num_clients=5, seed=s)) for s in seeds])
    dirichlet = np.mean([_label_skew(table, _partition(table, "dirichlet:0.3", num_clients=5, seed=s))
                         for s in seeds])
    assert iid < 0.1
    assert dirichlet > 0.2
    assert dirichlet > 3 * iid


def test_large_alpha_dirichlet_is_close_to_iid() -> None:
    table = _table(300)
    assert _label_skew(table, _partition(table, "dirichlet:1000", num_clients=5, seed=0)) < 0.1


def test_partition_spec_object_accepted() -> None:
    table = _table(60)
    a = _partition(table, "dirichlet:2", num_clients=3, seed=4)
    b = partition_indices(table, PartitionSpec("dirichlet", alpha=2.0), num_clients=3, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("spec", ["iid", "dirichlet:0.5", "natural:site"])
def test_more_clients_than_rows(spec: str) -> None:
    table = _table(5, sites=list("abcde"))
    with pytest.raises(FedPeftError, match="6 clients but only 5 training examples"):
        partition_indices(table, spec, num_clients=6, seed=0)


def test_one_row_per_client_iid() -> None:
    table = _table(6)
    _assert_disjoint_cover(_partition(table, "iid", num_clients=6, seed=0), 6, 6)


def test_invalid_spec_string_raises() -> None:
    with pytest.raises(FedPeftError, match="unknown partition spec"):
        partition_indices(_table(20), "shards:2", num_clients=2, seed=0)


# --- natural ------------------------------------------------------------------------------------

def _site_table() -> tuple[LabelledTable, list[str]]:
    """200 rows over sites of different sizes, interleaved; first appearance order is d, c, b, a."""
    sites = ["d", "c", "b", "a"] + list(np.random.default_rng(0).choice(["a", "b", "c", "d"], size=196,
                                                                         p=[0.4, 0.3, 0.2, 0.1]))
    return _table(len(sites), sites=sites), sites


def test_natural_one_client_per_value_in_sorted_order() -> None:
    table, sites = _site_table()
    parts = _partition(table, "natural:site", num_clients=4, seed=0)
    _assert_disjoint_cover(parts, len(table), 4)
    arr = np.array(sites)
    for value, part in zip(["a", "b", "c", "d"], parts, strict=True):
        assert np.array_equal(part, np.flatnonzero(arr == value))


def test_natural_ignores_seed_and_is_deterministic() -> None:
    table, _ = _site_table()
    a = _partition(table, "natural:site", num_clients=4, seed=0)
    b = _partition(table, "natural:site", num_clients=4, seed=99)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_natural_numeric_like_values_sorted_as_strings() -> None:
    sites = ["9", "10", "2", "10", "9", "2", "2"]
    parts = _partition(_table(7, sites=sites), "natural:site", num_clients=3, seed=0)
    # string order: "10" < "2" < "9"
    assert [list(p) for p in parts] == [[1, 3], [2, 5, 6], [0, 4]]


@pytest.mark.parametrize("num_clients", [2, 5])
def test_natural_client_count_mismatch_suggests_clients(num_clients: int) -> None:
    table, _ = _site_table()
    assert natural_client_count(table, parse_partition_spec("natural:site")) == 4
    with pytest.raises(FedPeftError, match=f"gives 4 clients .*not {num_clients}.*--clients 4"):
        partition_indices(table, "natural:site", num_clients=num_clients, seed=0)


def test_natural_unknown_column_lists_columns() -> None:
    table, _ = _site_table()
    with pytest.raises(FedPeftError, match="partition column 'hospital' not in the data") as info:
        partition_indices(table, "natural:hospital", num_clients=4, seed=0)
    assert "text, label, site" in str(info.value)
