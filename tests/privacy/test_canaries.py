"""Canaries: reproducible from a seed, half included, spread over the sites, saved secret; per-example
losses for scoring them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from privacy.canaries import load_canaries, make_canaries, save_canaries, site_canaries


def test_canaries_are_random_spread_and_half_included(tmp_path: Path) -> None:
    canaries = make_canaries(400, label_names=["fresh", "rotten"], sites=["a", "b", "c"], seed=3)
    assert canaries == make_canaries(400, label_names=["fresh", "rotten"], sites=["a", "b", "c"], seed=3)
    assert len({c.text for c in canaries}) == 400 and all(len(c.text.split()) == 8 for c in canaries)
    assert 160 < sum(c.member for c in canaries) < 240  # Binomial(400, 1/2)
    assert {c.label for c in canaries} == {"fresh", "rotten"}
    assert [c.site for c in canaries[:4]] == ["a", "b", "c", "a"]
    assert site_canaries(canaries, "b") == [c for c in canaries if c.site == "b" and c.member]
    secret = make_canaries(400, label_names=["x"], sites=["a"])  # no seed: a secret draw each time
    assert [c.member for c in secret] != [c.member for c in make_canaries(400, label_names=["x"], sites=["a"])]
    path = tmp_path / "canaries.jsonl"
    save_canaries(path, canaries)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and load_canaries(path) == canaries
    path.write_text('{"index": 0}\n')
    with pytest.raises(ValueError, match="line 1 is not a canary"):
        load_canaries(path)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        make_canaries(1, label_names=["x"], sites=["a"])


def test_example_losses_are_each_examples_cross_entropy() -> None:
    from fedpeft.training import Encoded, example_losses

    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 2)

    class Toy(torch.nn.Module):
        def forward(self, input_ids, attention_mask):  # noqa: ANN001, ANN202
            class Out:
                logits = (emb(input_ids) * attention_mask[..., None]).sum(1)
            return Out()

    rng = np.random.default_rng(0)
    data = Encoded(input_ids=[list(rng.integers(1, 50, size=int(n))) for n in rng.integers(1, 9, size=13)],
                   labels=rng.integers(0, 2, size=13), pad_id=0)
    got = example_losses(Toy(), data, batch_size=4)
    for i, ids in enumerate(data.input_ids):
        logits = emb(torch.tensor([ids])).sum(1)
        want = torch.nn.functional.cross_entropy(logits, torch.tensor([int(data.labels[i])])).item()
        assert got[i] == pytest.approx(want, rel=1e-5, abs=1e-6)
