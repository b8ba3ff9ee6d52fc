"""``fedpeft export --merge``: the merged model, loaded in a fresh interpreter with transformers alone (no
fedpeft, no peft imported), gives the logits of the run's base model + adapter, for LoRA and SSF."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.cli.main import main
from fedpeft.config import FedPeftConfig
from fedpeft.site import Site, SiteModel
from server.run import save_adapter

TEXTS = ["A small gem of a movie.", "Two hours I will never get back.", "fine"]


def finished_run(tmp_path: Path, model_dir: Path, peft: str) -> tuple[Path, np.ndarray]:
    """A run directory holding a trained-looking adapter (every tensor moved off its initial value), and the
    logits of base model + that adapter."""
    cfg = FedPeftConfig(model=str(model_dir), peft=peft, strategy="ssf-avg" if peft == "ssf" else "fedit",
                        seed=4321, out=str(tmp_path / "run"))
    labels = ["fresh", "rotten"]
    model = SiteModel(cfg, 2).model
    rng = np.random.default_rng(0)
    state = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in adapter_state(model).items()}
    run = Path(cfg.out)
    run.mkdir()
    (run / "config.json").write_text(cfg.to_json())
    save_adapter(model, state, run / "adapter", cfg=cfg, label_names=labels)
    load_adapter_state(model, state)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model.eval()
    with torch.no_grad():
        logits = model(**tokenizer(TEXTS, return_tensors="pt", padding=True)).logits.numpy()
    return run, logits


@pytest.mark.parametrize(("peft", "pooling"), [("lora", "cls"), ("ssf", "cls"), ("lora", "mean"), ("ssf", "mean")])
def test_merged_model_loads_without_fedpeft_and_matches(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                       tiny_model_dir: Path, tiny_st_model_dir: Path, peft: str,
                                                       pooling: str) -> None:
    # mean: a sentence-transformers directory whose declared pooling (auto) the run and the export keep
    run, want = finished_run(tmp_path, tiny_st_model_dir if pooling == "mean" else tiny_model_dir, peft)
    meta = json.loads((run / "adapter" / "fedpeft.json").read_text())
    assert meta["pooling"] == pooling and meta["pooling_normalize"] == (pooling == "mean")
    assert (run / "adapter" / "modeling_mean_pooling.py").exists() == (pooling == "mean")
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--out", str(out)]) == 0
    assert "merged model saved to" in capsys.readouterr().out
    script = textwrap.dedent(f"""
        import json, sys
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        model = AutoModelForSequenceClassification.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == {"MeanPoolingForSequenceClassification" if pooling == "mean"
                                        else "BertForSequenceClassification"!r}
        tok = AutoTokenizer.from_pretrained({str(out)!r})
        with torch.no_grad():
            logits = model(**tok({TEXTS!r}, return_tensors="pt", padding=True)).logits
        assert "fedpeft" not in sys.modules and "peft" not in sys.modules, "imported more than transformers"
        print(json.dumps({{"logits": logits.tolist(), "labels": model.config.id2label}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(np.array(got["logits"]), want, rtol=1e-4, atol=1e-5)
    assert got["labels"] == {"0": "fresh", "1": "rotten"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "run"]  # no build directory left


def test_export_refusals_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                      tiny_model_dir: Path) -> None:
    run, _ = finished_run(tmp_path, tiny_model_dir, "lora")
    (tmp_path / "taken").mkdir()
    cases = [
        (["export", str(tmp_path / "nowhere"), "--merge", "--out", str(tmp_path / "m")], "run directory not found"),
        (["export", str(run), "--merge", "--out", str(tmp_path / "taken")], "exists; choose another --out or pass"),
        (["export", str(run), "--merge", "--out", str(tmp_path / "m"), "--base", str(tmp_path / "no-model")],
         "model path not found"),
        (["export", str(tmp_path), "--merge", "--out", str(tmp_path / "m")], "has no saved adapter"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (argv, err)
    assert not (tmp_path / "m").exists()


def test_extra_examples_are_appended_with_the_runs_labels(tiny_model_dir: Path) -> None:
    from fedpeft.errors import FedPeftError
    from fedpeft.training import Encoded

    cfg = FedPeftConfig(model=str(tiny_model_dir))
    data = Encoded(input_ids=[[101, 7, 102]], labels=np.array([0]), pad_id=0)
    held = Site(key="s", partition_id=0, num_partitions=1, model=SiteModel(cfg, 2), data=data, state_dir=Path("."),
                source=())
    more = held.with_extra_examples([["qwzx plok", "rotten"], ["fresh text", "fresh"]],
                                    label_names=["fresh", "rotten"], max_length=cfg.max_length)
    assert len(more) == 3 and more.labels.tolist() == [0, 1, 0] and more.input_ids[0] == [101, 7, 102]
    assert held.with_extra_examples([], label_names=["fresh", "rotten"], max_length=cfg.max_length) is data
    with pytest.raises(FedPeftError, match="labels \\['meh'\\] the run does not know"):
        held.with_extra_examples([["x", "meh"]], label_names=["fresh", "rotten"], max_length=cfg.max_length)


@pytest.mark.parametrize("peft", ["lora"])
def test_readme_snippet_loads_a_mean_pooling_adapter_with_plain_peft(tmp_path: Path, tiny_st_model_dir: Path,
                                                                     peft: str) -> None:
    """docs/getting-started.md, "Load the result with plain transformers + peft": the adapter directory ships
    the head's code."""
    run, want = finished_run(tmp_path, tiny_st_model_dir, peft)
    adapter, base_dir = run / "adapter", tiny_st_model_dir
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(adapter)!r})          # the run ships the head's code beside the adapter
        from modeling_mean_pooling import MeanPoolingForSequenceClassification
        from peft import PeftModel
        from transformers import AutoConfig, AutoTokenizer
        import torch
        base_dir = {str(base_dir)!r}
        meta = json.load(open({str(adapter / "fedpeft.json")!r}))
        config = AutoConfig.from_pretrained(base_dir, num_labels=len(meta["label_names"]))
        config.pooling_normalize = meta["pooling_normalize"]
        base = MeanPoolingForSequenceClassification.from_pretrained(base_dir, config=config)
        model = PeftModel.from_pretrained(base, {str(adapter)!r}).eval()
        tok = AutoTokenizer.from_pretrained(base_dir)
        with torch.no_grad():
            logits = model(**tok({TEXTS!r}, return_tensors="pt", padding=True)).logits
        assert "fedpeft" not in sys.modules, "imported fedpeft"
        print(json.dumps(logits.tolist()))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.array(json.loads(proc.stdout.strip().splitlines()[-1])), want, rtol=1e-4, atol=1e-5)
