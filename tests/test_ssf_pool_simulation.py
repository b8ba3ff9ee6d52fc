"""End to end with ``--peft ssf-pool`` (FedIns): a real Flower simulation that learns, where only the
pools, their keys and the head travel, whose export predicts in plain transformers (a fresh interpreter,
``trust_remote_code``) exactly what fedpeft predicts, and the same run under local DP, ledgered and audited.

The model and task are SSF's (``ssf_setting`` in conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

POOL = ("--peft", "ssf-pool", "--ssf-pool-size", "3", "--ssf-pool-select", "2")


def simulate(out: Path, model: Path, data: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(model), "--data", str(data), *POOL,
           "--clients", "3", "--fraction", "1", "--batch-size", "16", "--client-cpus", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, ssf_setting: tuple[Path, Path]) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("sim") / "run"
    model, data = ssf_setting
    return out, simulate(out, model, data, "--rounds", "4", "--local-epochs", "2", "--max-local-steps", "0",
                         "--lr", "0.03")


def test_the_pool_learns_with_fedins(run: tuple[Path, list[dict]]) -> None:
    out, records = run
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["strategy"] == "fedins"  # --peft ssf-pool chose it
    assert records[0]["accuracy"] < 0.65
    assert records[-1]["accuracy"] >= 0.9


def test_only_pools_keys_and_the_head_travel(run: tuple[Path, list[dict]]) -> None:
    from safetensors.numpy import load_file

    out, records = run
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    pools = [k for k in saved if k.split(".")[-2] == "ssf_pool" and k != "ssf_pool.keys"]
    assert set(saved) == {*pools, "ssf_pool.keys", "classifier.weight", "classifier.bias"}
    assert len(pools) == 2 * 18 and all(saved[k].shape[0] == 3 and saved[k].ndim == 2 for k in pools)
    assert saved["ssf_pool.keys"].shape == (3, 32)
    # entries differ after training: inputs chose different ones, and a chosen entry learns
    scales = [saved[k] for k in pools if k.endswith("scale")]
    assert any(not np.allclose(s[0], s[1]) or not np.allclose(s[1], s[2]) for s in scales)
    payload = sum(v.nbytes for v in saved.values())
    for r in records[1:]:
        assert payload <= r["bytes_up_per_client"] <= payload * 1.05 + 4096


EXPORTED = """
import json, sys
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(sys.argv[2])
batch = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
print(json.dumps({"logits": logits.tolist(), "class": type(model).__name__,
                  "fedpeft": any(m.split(".")[0] in ("fedpeft", "client", "server", "strategies", "privacy")
                                 for m in sys.modules)}))
"""


def test_export_predicts_in_plain_transformers_what_fedpeft_predicts(run: tuple[Path, list[dict]],
                                                                    ssf_setting: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft.adapters.ssf_pool.model import SSFPoolModel
    from fedpeft.config import FedPeftConfig
    from fedpeft.data.sources import load_split

    out, records = run
    model_dir, data = ssf_setting
    proc = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "export", str(out), "--merge", "--out",
                           str(tmp_path / "exported")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trust_remote_code=True" in proc.stdout
    _, test = load_split(FedPeftConfig(data=str(data)))
    texts = list(test.texts)
    meta = json.loads((out / "adapter" / "fedpeft.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(meta["label_names"]))
    model = SSFPoolModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")).logits
    accuracy = float((expected.argmax(-1).numpy() == test.labels).mean())
    assert accuracy == pytest.approx(records[-1]["accuracy"], abs=1e-9)
    fresh = subprocess.run([sys.executable, "-I", "-c", EXPORTED, str(tmp_path / "exported"), json.dumps(texts)],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    result = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert result["class"] == "FedInsForSequenceClassification" and not result["fedpeft"]
    torch.testing.assert_close(torch.tensor(result["logits"]), expected, rtol=1e-5, atol=1e-5)


def test_ssf_pool_under_local_dp(tmp_path: Path, ssf_setting: tuple[Path, Path]) -> None:
    """DP-SGD on the pool and its keys through Opacus with fedpeft's rules: ledgered and audited."""
    model, data = ssf_setting
    records = simulate(tmp_path / "run", model, data, "--dp", "--rounds", "2", "--max-local-steps", "3")
    assert all(r["clients"] == 3 for r in records[1:])
    assert 0 < records[-1]["epsilon_max"] <= 8.0
    proc = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

