"""The heterogeneity recipe in a real simulation (Ray workers): label correction, SCAFFOLD and a server
optimizer together, with every train reply written down as it leaves the site.

A site's label counts shape its local loss and nothing else: no reply carries a record, a metric or an
array that the run without a label correction would not carry, and the reported training loss is the
plain one. SCAFFOLD adds exactly one array record, the change of the site's variate, for the tensors
the site trained; the site's variate is on its own disk.

The same runs record every run setting the sites' code reads (``$FEDPEFT_TEST_READS``): each one is among
the settings a request carries (:data:`fedpeft.protocol.SITE_SETTINGS`), so a site never acts on a
default in place of the run's value.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fedpeft.protocol import QUERY_KEYS, SETTING, SITE_SETTINGS, TRAIN_KEYS

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


def run(tmp: Path, model: Path, data: Path, **recipe: object) -> tuple[Path, list[dict]]:
    out, capture, reads = tmp / "run", tmp / "replies.jsonl", tmp / "reads.jsonl"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        from capturing_client import app
        from fedpeft.config import FedPeftConfig
        from server.simulate import simulate
        cfg = FedPeftConfig(model={str(model)!r}, data={str(data)!r}, clients=2, rounds=3, fraction=1.0,
                            max_local_steps=3, batch_size=8, client_cpus=1, out={str(out)!r}, **{recipe!r})
        simulate(cfg, client_app=app)
    """)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FEDPEFT_TEST_CAPTURE": str(capture),
           "FEDPEFT_TEST_READS": str(reads)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    check_reads([json.loads(line) for line in reads.read_text().splitlines()])
    return out, [json.loads(line) for line in capture.read_text().splitlines()]


def check_reads(messages: list[dict]) -> None:
    """Every setting a site read is one the request carried, and a request carries nothing else."""
    assert {m["type"] for m in messages} == {"query", "train"}
    for message in messages:
        assert message["read"] and set(message["read"]) <= SITE_SETTINGS, set(message["read"]) - SITE_SETTINGS
        sent = {k.removeprefix(SETTING) for k in message["request"] if k.startswith(SETTING)}
        assert sent == SITE_SETTINGS
        allowed = QUERY_KEYS if message["type"] == "query" else TRAIN_KEYS
        assert {k for k in message["request"] if not k.startswith(SETTING)} <= allowed


def test_label_correction_scaffold_and_a_server_optimizer(tmp_path: Path, tiny_model_dir: Path,
                                                          small_data: Path) -> None:
    _, plain = run(tmp_path / "plain", tiny_model_dir, small_data, probe_rounds=1, drift="none")
    out, replies = run(tmp_path / "recipe", tiny_model_dir, small_data, probe_rounds=1,
                       label_correction="balanced", drift="scaffold", server_opt="avgm")
    assert len(replies) == len(plain) == 6  # 2 sites x 3 rounds
    for got, base in zip(sorted(replies, key=lambda r: (r["round"], r["site"])),
                         sorted(plain, key=lambda r: (r["round"], r["site"])), strict=True):
        assert got["configs"] == base["configs"] == {"codec": ["codec", "dtype", "shapes", "tensors", "version"]}
        assert set(got["metrics"]) == set(base["metrics"]) == {"metrics"}
        assert set(got["metrics"]["metrics"]) == set(base["metrics"]["metrics"])  # no metric of its own
        assert set(got["arrays"]) == {"arrays", "control"} and set(base["arrays"]) == {"arrays"}
        assert got["arrays"]["arrays"] == base["arrays"]["arrays"]  # the same payload layout
        trained = got["arrays"]["control"]
        if got["round"] == 1:  # the probe round trains the head alone
            assert trained and all("classifier" in name for name in trained)
        else:
            assert any("lora_B" in name for name in trained)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["server_step_norm"] > 0 for r in records[1:])
    assert len(list((out / "sites").glob("partition-*/scaffold-variate-*.npz"))) == 2
