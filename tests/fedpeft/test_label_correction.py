"""Label-skew correction in the local loss: the offsets, and what they do to a head's training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedpeft.errors import FedPeftError
from fedpeft.label_correction import label_counts, logit_offsets, parse_label_correction
from fedpeft.probe import HeadProbe
from fedpeft.training import HeadInputs, train_local


@pytest.mark.parametrize(("spec", "parsed"), [
    ("none", ("none", 1.0)), ("balanced", ("balanced", 1.0)), ("fedlc", ("fedlc", 1.0)), ("fedlc:0.5", ("fedlc", 0.5)),
    ("balanced:2", ("balanced", 2.0)),
])
def test_parse(spec: str, parsed: tuple[str, float]) -> None:
    assert parse_label_correction(spec) == parsed


@pytest.mark.parametrize("spec", ["", "fedlc:0", "fedlc:-1", "fedlc:x", "none:1", "logit", "balanced:inf"])
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(FedPeftError, match="label_correction"):
        parse_label_correction(spec)


def test_offsets_by_hand() -> None:
    counts = label_counts(np.array([0, 0, 0, 2]), 4)  # [3, 0, 1, 0]
    np.testing.assert_array_equal(counts, [3, 0, 1, 0])
    balanced = logit_offsets(counts, method="balanced")
    np.testing.assert_allclose(balanced[[0, 2]], [np.log(0.75), np.log(0.25)], rtol=1e-6)
    fedlc = logit_offsets(counts, method="fedlc", tau=2.0)
    np.testing.assert_allclose(fedlc[[0, 2]], [-2.0 * 3 ** -0.25, -2.0], rtol=1e-6)
    for offsets in (balanced, fedlc):
        assert offsets.dtype == np.float32
        assert np.isneginf(offsets[[1, 3]]).all()  # an absent class leaves the softmax
    assert logit_offsets(counts, method="none") is None
    assert logit_offsets(np.zeros(4), method="balanced") is None
    with pytest.raises(ValueError):
        label_counts(np.array([0, 4]), 4)


def _train_head(method: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    before = head.weight.detach().clone()
    features = torch.randn(32, 4)
    labels = np.array([0] * 24 + [1] * 8)  # this site holds no example of class 2
    offsets = logit_offsets(label_counts(labels, 3), method=method) if method != "none" else None
    metrics = train_local(HeadProbe(head), HeadInputs(features, labels), epochs=5, max_steps=0, batch_size=8, lr=0.1,
                          weight_decay=0.0, seed=0, logit_offset=offsets)
    return before, head.weight.detach(), metrics["train_loss"]


@pytest.mark.parametrize("method", ["balanced", "fedlc"])
def test_a_class_the_site_lacks_is_left_alone(method: str) -> None:
    before, after, loss = _train_head(method)
    assert np.isfinite(loss)
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)  # no gradient for the absent class
    assert not torch.equal(after[:2], before[:2])
    before, after, _ = _train_head("none")
    assert not torch.equal(after[2], before[2])  # plain cross-entropy pushes it down
