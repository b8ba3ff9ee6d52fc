"""Data: bring-your-own JSONL/CSV tables, a held-out test split, and client partitions.

``DEFAULT_DATA`` is the bundled Rotten Tomatoes snippet corpus (see docs/data.md for provenance and
licence): 12,752 movie-review snippets labelled ``fresh``/``rotten``, with a ``movie`` column.
"""

from __future__ import annotations

from pathlib import Path

from fedpeft.data.loading import LabelledTable, load_labelled_table, split_test
from fedpeft.data.partition import parse_partition_spec, partition_indices

DEFAULT_DATA = Path(__file__).resolve().parent / "rotten_tomatoes.jsonl"

__all__ = [
    "DEFAULT_DATA",
    "LabelledTable",
    "load_labelled_table",
    "parse_partition_spec",
    "partition_indices",
    "split_test",
]
