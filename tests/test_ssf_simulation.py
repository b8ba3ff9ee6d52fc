"""End to end with ``--peft ssf``: a real Flower simulation whose accuracy rises over rounds, where only
SSF vectors and the head travel, whose saved adapter reloads and merges. (SSF under local DP:
tests/privacy/test_ssf_grad_sample.py, a private round at unit level; end to end, the SSF pool's DP run in
tests/test_ssf_pool_simulation.py.)

The model is a tiny random BERT initialised wider than BERT's default (std 0.1), so that its features
vary with the input as a pretrained model's do (SSF rescales features; it cannot create them). The
task: is the word "excellent" among random words.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

def simulate(out: Path, model: Path, data: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(model), "--data", str(data),
           "--peft", "ssf", "--clients", "3", "--fraction", "1", "--batch-size", "16", "--client-cpus", "1",
           "--out", str(out), *extra]
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


def test_accuracy_rises_over_rounds(run: tuple[Path, list[dict]]) -> None:
    out, records = run
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["strategy"] == "ssf-avg"  # --peft ssf chose it
    assert records[0]["accuracy"] < 0.65
    assert records[-1]["accuracy"] >= 0.9
    assert records[-1]["loss"] < 0.5 * records[0]["loss"]


def test_only_ssf_vectors_and_the_head_travel(run: tuple[Path, list[dict]], ssf_setting: tuple[Path, Path]) -> None:
    from safetensors.numpy import load_file

    out, records = run
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert all(k.split(".")[-2] == "ssf" or k.startswith("classifier.") for k in saved)
    ssf = [k for k in saved if k.split(".")[-2] == "ssf"]
    assert len(ssf) == 2 * 18 and all(saved[k].ndim == 1 for k in ssf)
    assert any(not np.allclose(saved[k], 1.0) for k in ssf if k.endswith("scale"))  # trained, aggregated
    payload = sum(v.nbytes for v in saved.values())
    assert records[-1]["adapter_bytes"] == payload
    for r in records[1:]:
        assert payload <= r["bytes_up_per_client"] <= payload * 1.05 + 4096
    base = (ssf_setting[0] / "model.safetensors").stat().st_size
    assert payload < 0.01 * base


def test_saved_adapter_reloads_and_merges_to_the_reported_accuracy(run: tuple[Path, list[dict]],
                                                                  ssf_setting: tuple[Path, Path]) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft.adapters.ssf.model import SSFModel
    from fedpeft.config import FedPeftConfig
    from fedpeft.data.sources import load_split

    out, records = run
    model_dir, data = ssf_setting
    meta = json.loads((out / "adapter" / "fedpeft.json").read_text())
    _, test = load_split(FedPeftConfig(data=str(data)))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batch = tokenizer(list(test.texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=len(meta["label_names"]))
    model = SSFModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        unmerged = model(**batch).logits
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    accuracy = float((unmerged.argmax(-1).numpy() == test.labels).mean())
    assert accuracy == pytest.approx(records[-1]["accuracy"], abs=1e-9)

