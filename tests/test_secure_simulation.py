"""Secure aggregation in a real simulation (Ray workers, four message stages a round): the global adapter
equals plain averaging's within the fixed-point step, the coordinator receives no update in the clear, and
a site that drops out after sharing its keys leaves the round to the others."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedpeft.adapters.lora.dynamic import draw_rank

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent


def run(tmp: Path, model: Path, data: Path, *, app: str = "", **settings: object) -> list[dict]:
    out = tmp / "run"
    load = f"from {app} import app" if app else "app = None"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        {load}
        from fedpeft.config import FedPeftConfig
        from server.simulate import simulate
        settings = dict(model={str(model)!r}, data={str(data)!r}, rounds=2, fraction=1.0, max_local_steps=3,
                        batch_size=8, client_cpus=1, drift="none", run_id="secure-test", out={str(out)!r})
        cfg = FedPeftConfig(**{{**settings, **{settings!r}}})
        simulate(cfg, **({{"client_app": app}} if app else {{}}))
    """)
    env = {**os.environ, "PYTHONPATH": str(TESTS), "FEDPEFT_TEST_DROPPED": str(tmp / "dropped")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_secure_sum_is_plain_averaging_within_the_fixed_point_step(tmp_path: Path, tiny_model_dir: Path,
                                                                        small_data: Path) -> None:
    plain = run(tmp_path / "plain", tiny_model_dir, small_data, clients=3)
    secure = run(tmp_path / "secure", tiny_model_dir, small_data, clients=3, secure_aggregation=True,
                 secagg_clip=100.0)  # no site's update is clipped: the only difference is the fixed point
    a = load_file(tmp_path / "plain" / "run" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "secure" / "run" / "adapter" / "adapter_model.safetensors")
    step = secure[1]["secagg_step"]
    assert step == pytest.approx(100.0 / (2**23 - 1))
    assert set(a) == set(b)
    gap = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert 0 < gap < 10 * step  # two rounds, each mean within half a step; round 2 trains from round 1's
    for row in secure[1:]:
        assert row["clients"] == 3 and row["secagg_dropped"] == 0
        assert row["num_examples"] == 0  # weights travel inside the masked sum only
    assert [r["clients"] for r in plain[1:]] == [3, 3]
    # the ring holds 3 sites' weighted sum and no more (24 bits, each site's examples as the cap), and its
    # elements travel in ⌈ring/8⌉ bytes: about 1.25x the plain update's bytes, where 64-bit elements were 2x
    assert 30 < secure[1]["secagg_ring_bits"] <= 40
    assert secure[1]["bytes_up_per_client"] < 1.4 * plain[1]["bytes_up_per_client"]


def test_a_site_that_drops_after_sharing_leaves_the_round_to_the_others(tmp_path: Path, tiny_model_dir: Path,
                                                                        small_data: Path) -> None:
    rows = run(tmp_path, tiny_model_dir, small_data, app="secure_dropout_client", clients=4, secure_aggregation=True)
    first, second = rows[1], rows[2]
    assert first["clients"] == 3 and first["secagg_dropped"] == 1 and first["failures"] == 1
    assert second["clients"] == 4 and second["secagg_dropped"] == 0
    assert (tmp_path / "dropped").exists()
    assert second["accuracy"] > 0  # the run went on from round 1's secure sum


def test_too_few_survivors_skip_the_round_with_the_reason_and_the_run_goes_on(tmp_path: Path, tiny_model_dir: Path,
                                                                             small_data: Path) -> None:
    rows = run(tmp_path, tiny_model_dir, small_data, app="secure_dropout_client", clients=4, secure_aggregation=True,
               secagg_threshold=4)  # every site must stay: the one that drops ends the round
    assert rows[1]["skipped"] is True and rows[1]["clients"] == 0
    assert rows[2]["clients"] == 4 and "skipped" not in rows[2]
    traffic = [json.loads(line) for line in (tmp_path / "run" / "traffic.jsonl").read_text().splitlines()]
    first = [t for t in traffic if t["round"] == 1]
    assert len(first) == 4 and all(t["status"] != "accepted" for t in first)
    reasons = sorted(t["reason"] for t in first)
    assert sum("3 masked inputs, 4 needed" in r for r in reasons) == 3  # the three that stayed say why
    assert sum("injected fault" in r for r in reasons) == 1


def test_central_dp_noises_the_secure_sum_and_the_audit_passes(tmp_path: Path, tiny_model_dir: Path,
                                                              small_data: Path) -> None:
    rows = run(tmp_path, tiny_model_dir, small_data, clients=4, fraction=0.5, secure_aggregation=True, dp="central",
               dp_epsilon=8.0, lora_dynamic_rank=True, seed=2,  # DP-DyLoRA: seed 2 draws ranks 2 and 3 of r 8
               codec="shared:0.5")  # only the round's shared half of the entries is masked and summed
    assert all(r["clients"] == 2 and r["dp_noise_std"] > 0 for r in rows[1:])
    assert [r["active_rank"] for r in rows[1:]] == [draw_rank(2, t, low=1, high=8) for t in (1, 2)] == [2, 3]
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    factors_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert factors_b and all(np.any(b[:, :3]) for b in factors_b)  # trained (and noised)
    assert all(not np.any(b[:, 3:]) for b in factors_b)  # never active: still B's zero init, no noise
    residuals = list((tmp_path / "run" / "sites").glob("*/codec-residual-*.npz"))
    assert residuals  # what the shared positions left out waits at each site
    assert rows[-1]["epsilon_max"] <= 8.0
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(tmp_path / "run")],
                           capture_output=True, text=True, timeout=300)
    assert audit.returncode == 0 and "audit: OK" in audit.stdout, audit.stdout + audit.stderr
