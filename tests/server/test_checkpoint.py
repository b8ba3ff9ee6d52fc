"""The checkpoint: an atomic, owner-only file per commit; logs cut back to it; the run's own config."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from fedpeft.cli.main import main
from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from server.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    load_checkpoint,
    log_sizes,
    resumed_config,
    rewind_logs,
    save_checkpoint,
)


def a_checkpoint(run_dir: Path, rnd: int = 2) -> Checkpoint:
    state = {"lora_A": np.arange(6, dtype=np.float32).reshape(2, 3), "head.bias": np.ones(2, np.float32)}
    return Checkpoint(run_id="r1", round=rnd, seed=123, population=3, ledger_count=4, ledger_head="ab" * 32,
                      logs=log_sizes(run_dir), state=state)


def test_round_trip_atomic_and_private(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    saved = a_checkpoint(tmp_path)
    save_checkpoint(tmp_path, saved)
    assert stat.S_IMODE(os.stat(tmp_path / CHECKPOINT_FILE).st_mode) == 0o600  # holds the secret sampling seed
    loaded = load_checkpoint(tmp_path)
    assert loaded.meta() == saved.meta() and loaded.logs == {"metrics.jsonl": 13, "traffic.jsonl": 0}
    assert set(loaded.state) == set(saved.state)
    for key, value in saved.state.items():
        assert loaded.state[key].dtype == value.dtype and np.array_equal(loaded.state[key], value)
    save_checkpoint(tmp_path, a_checkpoint(tmp_path, rnd=3))  # replaces, leaves no temporary file
    assert load_checkpoint(tmp_path).round == 3
    assert sorted(os.listdir(tmp_path)) == sorted(["metrics.jsonl", CHECKPOINT_FILE])


def test_unusable_checkpoints_are_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(FedPeftError, match="no run"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FedPeftError, match="a run without a checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(FedPeftError, match="unreadable"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, a_checkpoint(tmp_path))
    with np.load(tmp_path / CHECKPOINT_FILE) as data:
        arrays = dict(data)
    meta = json.loads(bytes(arrays["__checkpoint__"]))
    arrays["__checkpoint__"] = np.frombuffer(json.dumps({**meta, "version": 99}).encode(), dtype=np.uint8)
    np.savez(tmp_path / CHECKPOINT_FILE, **arrays)
    with pytest.raises(FedPeftError, match="another fedpeft version"):
        load_checkpoint(tmp_path)


def test_logs_are_cut_back_to_the_commit_and_never_grown(tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"round": 0}\n{"round": 1}\n')
    sizes = log_sizes(tmp_path)
    with open(metrics, "a") as fh:
        fh.write('{"round": 2}\n{"rou')  # the round that did not commit, torn by the crash
    (tmp_path / "traffic.jsonl").write_text('{"round": 2}\n')
    assert rewind_logs(tmp_path, sizes) == {"metrics.jsonl": 18, "traffic.jsonl": 13}
    assert metrics.read_text() == '{"round": 0}\n{"round": 1}\n' and (tmp_path / "traffic.jsonl").read_text() == ""
    assert rewind_logs(tmp_path, sizes) == {}
    metrics.write_text('{"round": 0}\n')
    with pytest.raises(FedPeftError, match="shorter than at the last checkpoint"):
        rewind_logs(tmp_path, sizes)


def test_a_resumed_run_keeps_its_own_config(tmp_path: Path) -> None:
    run = FedPeftConfig(rounds=7, clients=4, run_id="r1", out="somewhere/else")
    (tmp_path / "config.json").write_text(run.to_json())
    cfg = resumed_config(FedPeftConfig(resume=str(tmp_path)))
    assert cfg == FedPeftConfig(rounds=7, clients=4, run_id="r1", out=str(tmp_path), resume=str(tmp_path))
    assert resumed_config(FedPeftConfig(resume=str(tmp_path), rounds=7)).rounds == 7  # agrees: fine
    with pytest.raises(FedPeftError, match=r"these differ: rounds \(given 9, the run's 7\); lr"):
        resumed_config(FedPeftConfig(resume=str(tmp_path), rounds=9, lr=0.5))
    (tmp_path / "config.json").write_text("[1]")
    with pytest.raises(FedPeftError, match="config.json is unreadable"):
        resumed_config(FedPeftConfig(resume=str(tmp_path)))
    with pytest.raises(FedPeftError, match="no run there"):
        resumed_config(FedPeftConfig(resume=str(tmp_path / "missing")))


@pytest.mark.parametrize(("extra", "expected"), [
    (["--rounds", "9"], "--resume continues a run under its own config.json; drop --rounds"),
    ([], "cannot resume"),
])
def test_resume_refusals_in_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path, extra: list[str],
                                    expected: str) -> None:
    code = main(["simulate", "--resume", str(tmp_path / "nothing"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0]
