"""End to end: a real Flower simulation with a codec of each kind, through ``fedpeft simulate``.

Tiny random BERT, 3 clients, 2 adapter rounds each (see tests/test_simulation.py for the plain run), LoRA
rank 32 so that each factor (32 × 32) is large enough to be sparsified (smaller tensors are sent whole). Checks
that each codec's run completes with every reply accepted, that bytes on the wire shrink as the codec
promises, and that lossy codecs leave an error-feedback residual at each site.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_simulation import simulate

pytestmark = pytest.mark.slow

RANK = ("--lora-r", "32", "--probe-rounds", "0")  # every round trains the adapter (a probe round sends the head)
# One codec of each kind through Flower (quantiser, sparsifier chained with a quantiser, ComPEFT's signs and
# scale); each codec's own arithmetic is tests/fedpeft/codecs/ (a run here costs ~20 s of CI). compeft measured
# 16.1x on this adapter on 2026-12-07.
# codec → the least uplink compression it must show on the tiny adapter (33 KB; framing included)
CODECS = {"int4": 4.5, "topk:0.1+int8": 5.0, "compeft": 12.0}


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: Path) -> list[dict]:
    return simulate(tmp_path_factory.mktemp("none") / "run", tiny_model_dir, small_data, *RANK)


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_a_federated_run_completes_with_each_codec(
    codec: str, tmp_path: Path, tiny_model_dir: Path, small_data: Path, baseline: list[dict]
) -> None:
    out = tmp_path / "run"
    records = simulate(out, tiny_model_dir, small_data, *RANK, "--codec", codec)
    assert [r["round"] for r in records] == [0, 1, 2]
    for r, plain in zip(records[1:], baseline[1:], strict=True):
        assert r["clients"] == 2 and r["failures"] == 0
        assert r["compression_ratio"] >= CODECS[codec]
        assert r["bytes_up_per_client"] * CODECS[codec] <= plain["bytes_up_per_client"] * 1.02
        # the broadcast is not compressed (the run config it carries names the codec: a few bytes more)
        assert abs(r["bytes_down_per_client"] - plain["bytes_down_per_client"]) <= 64
        assert 0 < r["codec_error"] < 1
    traffic = [json.loads(line) for line in (out / "traffic.jsonl").read_text().splitlines()]
    assert len(traffic) == 4 and all(row["status"] == "accepted" for row in traffic)
    residuals = sorted(p.parent.name for p in (out / "sites").glob("*/codec-residual-*.npz"))
    assert residuals == sorted({row["site"] for row in traffic})  # every site that trained owes a residual


def test_delta_broadcast_sends_the_change(tmp_path: Path, tiny_model_dir: Path, small_data: Path,
                                          baseline: list[dict]) -> None:
    # the broadcast is its change since the last one, compeft-coded: every site holds the seeded initial adapter,
    # which round 1 broadcasts unchanged, so every message of the run is one change (tests/strategies covers
    # sites that missed rounds, which get every change since)
    out = tmp_path / "run"
    records = simulate(out, tiny_model_dir, small_data, *RANK, "--codec", "int8", "--downlink-delta",
                       "--downlink-codec", "compeft")
    assert [r["failures"] for r in records[1:]] == [0, 0]
    # 33 KB of floats and 1.5 KB of run config: 8.7x on 2026-12-08; the whole adapter goes at 0.98x
    assert records[1]["compression_ratio_down"] >= 6
    assert records[1]["bytes_down_per_client"] * 6 <= baseline[1]["bytes_down_per_client"]
    traffic = [json.loads(line) for line in (out / "traffic.jsonl").read_text().splitlines()]
    assert {row["round"] for row in traffic} == {1, 2} and len({row["site"] for row in traffic}) == 3
    assert max(row["bytes_down"] for row in traffic) < 5_000  # the whole adapter would be 33 KB
    kept = sorted(p.parent.name for p in (out / "sites").glob("*/broadcast-*.npz"))
    assert kept == sorted({row["site"] for row in traffic})  # each site keeps what a change applies to
    assert abs(records[-1]["accuracy"] - baseline[-1]["accuracy"]) <= 0.1
