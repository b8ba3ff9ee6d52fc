"""Reading labelled tables (JSONL/CSV/TSV, gzip) and the seeded test hold-out."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from fedpeft.data import DEFAULT_DATA, LabelledTable, load_labelled_table, split_test
from fedpeft.errors import FedPeftError

ROWS = [
    {"text": "great film", "label": "pos", "site": "a"},
    {"text": "awful plot", "label": "neg", "site": "b"},
    {"text": "fine acting", "label": "pos", "site": "a"},
    {"text": "boring", "label": "neg", "site": "c"},
    {"text": "a delight", "label": "pos", "site": "b"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_delimited(path: Path, rows: list[dict], sep: str) -> Path:
    cols = list(rows[0])
    lines = [sep.join(cols)] + [sep.join(str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _load(path: Path, text: str = "text", label: str = "label") -> LabelledTable:
    return load_labelled_table(path, text_column=text, label_column=label)


def _check_rows(table: LabelledTable, rows: list[dict]) -> None:
    assert len(table) == len(rows)
    assert table.texts == [r["text"] for r in rows]
    assert table.label_names == ("neg", "pos")
    assert table.labels.dtype == np.int64
    assert [table.label_names[i] for i in table.labels] == [r["label"] for r in rows]
    assert list(table.frame["site"]) == [r["site"] for r in rows]  # other columns are kept


def test_jsonl(tmp_path: Path) -> None:
    _check_rows(_load(_write_jsonl(tmp_path / "d.jsonl", ROWS)), ROWS)


def test_csv(tmp_path: Path) -> None:
    _check_rows(_load(_write_delimited(tmp_path / "d.csv", ROWS, ",")), ROWS)


def test_tsv(tmp_path: Path) -> None:
    _check_rows(_load(_write_delimited(tmp_path / "d.tsv", ROWS, "\t")), ROWS)


def test_gzipped_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in ROWS))
    _check_rows(_load(path), ROWS)


def test_uppercase_extension(tmp_path: Path) -> None:
    _check_rows(_load(_write_delimited(tmp_path / "D.CSV", ROWS, ",")), ROWS)


def test_custom_column_names(tmp_path: Path) -> None:
    rows = [{"body": r["text"], "y": r["label"], "site": r["site"]} for r in ROWS]
    table = _load(_write_jsonl(tmp_path / "d.jsonl", rows), text="body", label="y")
    assert table.texts == [r["body"] for r in rows]
    assert table.label_names == ("neg", "pos")


def test_label_ids_follow_sorted_names_not_row_order(tmp_path: Path) -> None:
    forward = [{"text": f"t{i}", "label": lab} for i, lab in enumerate(["zebra", "apple", "mango", "apple"])]
    backward = list(reversed(forward))
    t1 = _load(_write_jsonl(tmp_path / "f.jsonl", forward))
    t2 = _load(_write_jsonl(tmp_path / "b.jsonl", backward))
    assert t1.label_names == t2.label_names == ("apple", "mango", "zebra")
    assert list(t1.labels) == [2, 0, 1, 0]
    assert list(t2.labels) == [0, 1, 0, 2]


def test_numeric_labels_map_by_string_form(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([1, 0, 1, 0])]
    table = _load(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert table.label_names == ("0", "1")
    assert list(table.labels) == [1, 0, 1, 0]


def test_numeric_label_names_unaffected_by_dropped_rows(tmp_path: Path) -> None:
    """A row with a missing label is dropped; it must not turn the other labels' names into floats."""
    rows = [{"text": f"t{i}", "label": lab} for i, lab in enumerate([1, 0, 1, 0])] + [{"text": "x", "label": None}]
    table = _load(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert list(table.labels) == [1, 0, 1, 0]
    assert table.label_names == ("0", "1")


def test_rows_with_empty_text_or_label_dropped(tmp_path: Path) -> None:
    rows = [
        {"text": "keep one", "label": "pos", "site": "a"},
        {"text": "", "label": "neg", "site": "b"},
        {"text": "   ", "label": "neg", "site": "b"},
        {"text": "no label", "label": "", "site": "c"},
        {"text": None, "label": "pos", "site": "c"},
        {"text": "null label", "label": None, "site": "c"},
        {"text": "keep two", "label": "neg", "site": "d"},
        {"text": "  keep three  ", "label": " pos ", "site": "e"},
    ]
    table = _load(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert table.texts == ["keep one", "keep two", "keep three"]
    assert table.label_names == ("neg", "pos")
    assert list(table.labels) == [1, 0, 1]
    assert list(table.frame["site"]) == ["a", "d", "e"]
    assert list(table.frame.index) == [0, 1, 2]


def test_csv_empty_cells_dropped(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,a\n,b\nworld,\nbye,b\n")
    table = _load(path)
    assert table.texts == ["hello", "bye"]
    assert list(table.labels) == [0, 1]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FedPeftError, match="not found"):
        _load(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("name", ["d.txt", "d.parquet", "d.gz", "noext"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("text,label\na,b\n")
    with pytest.raises(FedPeftError, match=r"\.jsonl, \.json, \.csv or \.tsv"):
        _load(path)


def test_malformed_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok", "label": "a"}\n{"text": broken\n')
    with pytest.raises(FedPeftError, match="cannot parse"):
        _load(path)


def test_malformed_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,b\nc,d,e,f\n")
    with pytest.raises(FedPeftError, match="cannot parse"):
        _load(path)


def test_malformed_gzip(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(FedPeftError, match="cannot parse"):
        _load(path)


def test_header_only_csv_has_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\n")
    with pytest.raises(FedPeftError, match="no rows"):
        _load(path)


def test_missing_text_column_lists_columns(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(FedPeftError, match="text column 'body'") as info:
        _load(path, text="body")
    assert "columns: text, label, site" in str(info.value)


def test_missing_label_column_lists_columns(tmp_path: Path) -> None:
    path = _write_delimited(tmp_path / "d.csv", ROWS, ",")
    with pytest.raises(FedPeftError, match="label column 'stars'") as info:
        _load(path, label="stars")
    assert "columns: text, label, site" in str(info.value)


def test_single_class_label_column(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": "only"} for i in range(4)] + [{"text": "x", "label": ""}]
    with pytest.raises(FedPeftError, match="at least 2 classes"):
        _load(_write_jsonl(tmp_path / "d.jsonl", rows))


def _table(n: int) -> LabelledTable:
    import pandas as pd

    labels = np.arange(n) % 3
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(n)], "label": labels.astype(str)})
    return LabelledTable(frame=frame, texts=list(frame["text"]), labels=labels.astype(np.int64),
                         label_names=("0", "1", "2"))


def test_subset_keeps_alignment() -> None:
    table = _table(10)
    sub = table.subset(np.array([7, 2, 5]))
    assert sub.texts == ["row 7", "row 2", "row 5"]
    assert list(sub.labels) == [1, 2, 2]
    assert list(sub.frame["text"]) == sub.texts
    assert sub.label_names == table.label_names


@pytest.mark.parametrize(("n", "fraction", "n_test"), [(100, 0.1, 10), (101, 0.25, 25), (10, 0.5, 5), (7, 0.3, 2)])
def test_split_test_sizes(n: int, fraction: float, n_test: int) -> None:
    train, test = split_test(_table(n), test_fraction=fraction, seed=0)
    assert len(test) == n_test
    assert len(train) == n - n_test


def test_split_test_disjoint_cover_and_aligned() -> None:
    table = _table(200)
    train, test = split_test(table, test_fraction=0.2, seed=3)
    train_ids = {int(t.split()[1]) for t in train.texts}
    test_ids = {int(t.split()[1]) for t in test.texts}
    assert not train_ids & test_ids
    assert train_ids | test_ids == set(range(200))
    for part in (train, test):
        ids = [int(t.split()[1]) for t in part.texts]
        assert ids == sorted(ids)  # original order kept
        assert list(part.labels) == [i % 3 for i in ids]


def test_split_test_deterministic_by_seed() -> None:
    table = _table(200)
    a = split_test(table, test_fraction=0.2, seed=5)[1].texts
    b = split_test(table, test_fraction=0.2, seed=5)[1].texts
    c = split_test(table, test_fraction=0.2, seed=6)[1].texts
    assert a == b
    assert a != c


@pytest.mark.parametrize("fraction", [0.001, 0.999])
def test_split_test_rejects_empty_side(fraction: float) -> None:
    with pytest.raises(FedPeftError, match="no test or no training"):
        split_test(_table(20), test_fraction=fraction, seed=0)


def test_default_data_loads() -> None:
    table = load_labelled_table(DEFAULT_DATA, text_column="text", label_column="label")
    assert len(table) == 12_752
    assert table.label_names == ("fresh", "rotten")
    assert "movie" in table.frame.columns
    assert set(np.unique(table.labels)) == {0, 1}
    assert all(t.strip() for t in table.texts[:100])
