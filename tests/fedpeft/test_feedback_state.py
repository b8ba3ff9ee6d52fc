"""A site's error-feedback residual on disk: round trip, atomic, unreadable files named."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedpeft.feedback_state import load_residual, residual_path, save_residual


def test_round_trip_and_no_leftovers(tmp_path: Path) -> None:
    path = residual_path(tmp_path, "partition-00003", "run/1")
    assert path.parent.name == "partition-00003" and path.name == "codec-residual-run_1.npz"
    assert load_residual(path) is None
    residual = {"b.lora_B.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "head": np.ones(2, np.float32)}
    save_residual(path, residual)
    got = load_residual(path)
    assert got is not None and set(got) == set(residual)
    for k, v in residual.items():
        np.testing.assert_array_equal(got[k], v)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was renamed away
    save_residual(path, {})
    assert not path.exists()


def test_unreadable_residual_is_named(tmp_path: Path) -> None:
    path = residual_path(tmp_path, "s", "r")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="unreadable"):
        load_residual(path)


def test_a_failed_write_keeps_the_previous_residual(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = residual_path(tmp_path, "s", "r")
    save_residual(path, {"a": np.ones(3, np.float32)})

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_residual(path, {"a": np.zeros(3, np.float32)})
    np.testing.assert_array_equal(load_residual(path)["a"], np.ones(3, np.float32))
    assert [p.name for p in path.parent.iterdir()] == [path.name]
