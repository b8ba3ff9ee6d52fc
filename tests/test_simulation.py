"""End to end: a real Flower simulation (Ray backend) through ``fedpeft simulate``.

One tiny random BERT (with the real MiniLM tokenizer) on 400 real review snippets, 3 clients, 2 rounds.
Checks the run directory, that only the adapter travels (bytes on the wire), that plain
transformers + peft reproduce the reported accuracy from ``adapter/``, that the same seed gives an
identical ``metrics.jsonl``, and what the default output and ``--quiet`` print (``--json``: test_output.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REQUIRED = {"round", "accuracy", "loss", "bytes_up", "bytes_down"}


def cli(out: Path, model: Path, data: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(model), "--data", str(data),
           "--clients", "3", "--rounds", "2", "--fraction", "0.67", "--max-local-steps", "3", "--batch-size", "8",
           "--client-cpus", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def simulate(out: Path, model: Path, data: Path, *extra: str) -> list[dict]:
    cli(out, model, data, *extra)
    return metrics(out)


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, small_data: Path) -> tuple[Path, str]:
    """The module's run, with what it printed (the default output: the round table and the summary)."""
    out = tmp_path_factory.mktemp("sim") / "run"
    return out, cli(out, tiny_model_dir, small_data).stdout


@pytest.fixture(scope="module")
def run(printed: tuple[Path, str]) -> tuple[Path, list[dict]]:
    out, _ = printed
    return out, metrics(out)


def test_run_directory(run: tuple[Path, list[dict]]) -> None:
    out, records = run
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records:
        assert REQUIRED <= r.keys()
        assert 0.0 <= r["accuracy"] <= 1.0
    assert all(r["clients"] == 2 for r in records[1:])  # floor(3 * 0.67) = 2
    config = json.loads((out / "config.json").read_text())
    assert config["rounds"] == 2 and config["clients"] == 3
    saved = {p.name for p in (out / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "fedpeft.json"} <= saved


def test_only_the_adapter_travels(run: tuple[Path, list[dict]], tiny_model_dir: Path) -> None:
    _, records = run
    base_bytes = (tiny_model_dir / "model.safetensors").stat().st_size
    for r in records[1:]:
        payload = r["adapter_bytes"]
        # Each reply is the serialized adapter plus a little framing (keys, dtypes, shapes, metrics).
        assert payload <= r["bytes_up_per_client"] <= payload * 1.05 + 4096
        assert r["bytes_up"] == r["bytes_up_per_client"] * r["clients"]
        assert payload <= r["bytes_down_per_client"] <= payload * 1.05 + 8192
        assert r["bytes_up_per_client"] * 10 < base_bytes


def test_saved_adapter_reproduces_accuracy_with_plain_peft(run: tuple[Path, list[dict]], tiny_model_dir: Path,
                                                           small_data: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedpeft.data import load_labelled_table, split_test

    out, records = run
    meta = json.loads((out / "adapter" / "fedpeft.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=len(meta["label_names"]))
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    _, test = split_test(load_labelled_table(small_data, text_column="text", label_column="label"),
                         test_fraction=0.1, seed=0)
    with torch.no_grad():
        batch = tokenizer(test.texts, truncation=True, max_length=meta["max_length"], padding=True, return_tensors="pt")
        predictions = model(**batch).logits.argmax(-1).numpy()
    names = [meta["label_names"][p] for p in predictions]
    accuracy = sum(n == test.label_names[y] for n, y in zip(names, test.labels, strict=True)) / len(test)
    assert accuracy == pytest.approx(records[-1]["accuracy"], abs=1e-9)


def test_the_table_prints_a_summary(printed: tuple[Path, str]) -> None:
    out, stdout = printed
    assert "round  clients" in stdout and "fedpeft run summary" in stdout
    flat = "".join(stdout.split()).replace("│", "")  # the summary folds long paths across lines
    assert str(out / "report.md").replace(" ", "") in flat


def test_same_seed_same_metrics_and_quiet_prints_nothing(run: tuple[Path, list[dict]], tiny_model_dir: Path,
                                                         small_data: Path, tmp_path: Path) -> None:
    out, _ = run
    again = tmp_path / "again"
    assert cli(again, tiny_model_dir, small_data, "--quiet").stdout == ""
    assert (again / "metrics.jsonl").read_text() == (out / "metrics.jsonl").read_text()  # whatever is printed


def test_natural_partition_runs_one_client_per_site(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "sites.csv"
    rows = [
        f"great film {i},fresh,site{i % 3}\n" if i % 2 else f"dull film {i},rotten,site{i % 3}\n" for i in range(90)
    ]
    data.write_text("text,label,hospital\n" + "".join(rows))
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(tiny_model_dir), "--data", str(data),
           "--partition", "natural:hospital", "--rounds", "1", "--fraction", "1.0", "--max-local-steps", "2",
           "--client-cpus", "1", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["clients"] == 3  # one per distinct hospital, without --clients


def test_ffa_lora_uploads_and_broadcasts_no_A(run: tuple[Path, list[dict]], tiny_model_dir: Path, small_data: Path,
                                               tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    _, default = run
    records = simulate(tmp_path / "ffa", tiny_model_dir, small_data, "--strategy", "ffa-lora")
    saved = load_file(str(tmp_path / "ffa" / "adapter" / "adapter_model.safetensors"))
    a_bytes = sum(v.nbytes for k, v in saved.items() if ".lora_A." in k)
    assert a_bytes > 0
    for ffa, full in zip(records[1:], default[1:], strict=True):
        # the same adapter travels minus every A factor, up and down
        assert ffa["bytes_up_per_client"] <= full["bytes_up_per_client"] - a_bytes + 512
        assert ffa["bytes_down_per_client"] <= full["bytes_down_per_client"] - a_bytes + 512
        assert ffa["agg_residual_max"] < 1e-3  # averaging B under a shared A is exact


def test_exact_svd_with_mixed_client_ranks(tiny_model_dir: Path, small_data: Path, tmp_path: Path) -> None:
    records = simulate(tmp_path / "svd", tiny_model_dir, small_data, "--strategy", "exact-svd",
                       "--client-ranks", "2,8", "--fraction", "1")
    assert [r["round"] for r in records] == [0, 1, 2]
    for r in records[1:]:
        assert r["clients"] == 3
        assert 0.0 <= r["agg_residual_mean"] <= r["agg_residual_max"] < 1.0
        # two sites get rank-2 factors, one the full rank-8 adapter: the mean download is below a full one
        assert r["bytes_down_per_client"] < r["adapter_bytes"]


def test_mixed_ranks_need_a_strategy_that_supports_them(tiny_model_dir: Path, small_data: Path,
                                                        tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--model", str(tiny_model_dir), "--data",
           str(small_data), "--strategy", "lora-fair", "--client-ranks", "2,8", "--out", str(tmp_path / "x")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "use exact-svd for mixed ranks" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x").exists()
