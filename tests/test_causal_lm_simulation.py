"""End to end: federated instruction tuning of tiny random decoder LMs through ``fedpeft simulate``.

A 2-layer Llama (ChatML template) and a GPT-2 (no template) trained with LoRA on the attention and MLP
projections, 3 clients, 2 rounds: the held-out response loss falls under the rules that depend on the
decoder's shapes and under SSF; local DP (hooks and ghost clipping) completes with a clean audit; the
merged export loads with plain ``AutoModelForCausalLM`` and reproduces the run's held-out loss.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def simulate(out: Path, model: Path, data: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--task", "causal-lm", "--model", str(model),
           "--data", str(data), "--clients", "3", "--rounds", "2", "--fraction", "1", "--max-local-steps", "8",
           "--batch-size", "8", "--lr", "0.01", "--max-length", "48", "--client-cpus", "1", "--out", str(out),
           *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def traffic(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "traffic.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory: pytest.TempPathFactory, tiny_lm_dir: Path, instruction_data: Path):
    out = tmp_path_factory.mktemp("lm") / "run"
    return out, simulate(out, tiny_lm_dir, instruction_data)


def test_held_out_loss_falls_over_two_rounds(llama_run) -> None:
    out, records = llama_run
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["loss"] < records[1]["loss"] < records[0]["loss"]
    for r in records:
        assert r["perplexity"] == pytest.approx(2.718281828459045 ** r["loss"], rel=1e-6)
    assert all(row["status"] == "accepted" for row in traffic(out)) and len(traffic(out)) == 6
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["modules_to_save"] is None
    assert sorted(adapter["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])
    assert json.loads((out / "adapter" / "fedpeft.json").read_text())["task"] == "causal-lm"
    report = (out / "report.md").read_text()
    assert "test perplexity" in report and f"{records[-1]['perplexity']:.3f}" in report


def test_merged_export_loads_as_a_plain_causal_lm(llama_run, tmp_path: Path, instruction_data: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedpeft.config import FedPeftConfig
    from fedpeft.tasks.causal_lm import evaluate
    from server.evaluation import Evaluator

    out, records = llama_run
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "export", str(out), "--merge", "--out",
                           str(merged)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "AutoModelForCausalLM" in proc.stdout
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    config = json.loads((out / "config.json").read_text())
    cfg = FedPeftConfig.from_mapping({k: v for k, v in config.items() if k not in ("out", "run_id")})
    assert AutoTokenizer.from_pretrained(merged).chat_template
    got = evaluate(model, Evaluator(cfg).test, batch_size=64)
    assert got["loss"] == pytest.approx(records[-1]["loss"], rel=1e-4)


# What depends on the decoder: LoRA-FAIR's correction over the seven projections, mixed ranks cut from
# them, and SSF's surgery of a Llama. Rules and codecs that read only the factors (lora-fair-ab, ffa-lora,
# topk) are the classifier's end-to-end runs and their own unit tests; a run here costs ~25 s of CI.
@pytest.mark.parametrize("extra", [
    ("--strategy", "lora-fair"),
    ("--strategy", "exact-svd", "--client-ranks", "4,8"),
    ("--peft", "ssf", "--lr", "0.05"),
], ids=lambda e: " ".join(e))
def test_every_strategy_ssf_and_codec_learn(extra: tuple[str, ...], tmp_path: Path, tiny_lm_dir: Path,
                                            instruction_data: Path) -> None:
    out = tmp_path / "run"
    records = simulate(out, tiny_lm_dir, instruction_data, *extra)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[2]["loss"] < records[0]["loss"]
    assert all(row["status"] == "accepted" for row in traffic(out))


def test_gpt2_without_a_chat_template_learns(tmp_path: Path, tiny_gpt2_dir: Path, instruction_data: Path) -> None:
    records = simulate(tmp_path / "run", tiny_gpt2_dir, instruction_data, "--partition", "natural:site")
    assert records[2]["loss"] < records[0]["loss"]


# Per-example clipping through a decoder's token-level loss, in both of opacus' modes. Central DP clips a
# site's update, whatever the model: tests/privacy/test_central_dropout.py runs it end to end.
@pytest.mark.parametrize("extra", [
    ("--dp", "local", "--dp-clipping", "hooks"),
    ("--dp", "local", "--dp-clipping", "ghost"),
], ids=lambda e: " ".join(e))
def test_dp_runs_complete_and_audit_clean(extra: tuple[str, ...], tmp_path: Path, tiny_lm_dir: Path,
                                          instruction_data: Path) -> None:
    out = tmp_path / "run"
    records = simulate(out, tiny_lm_dir, instruction_data, *extra)
    assert [r["round"] for r in records] == [0, 1, 2]
    assert 0 < records[-1]["epsilon_max"] <= 8.0 + 1e-6
    assert all(row["status"] == "accepted" for row in traffic(out))
    proc = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
