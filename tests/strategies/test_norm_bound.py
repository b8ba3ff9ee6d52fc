"""Norm bounding: the clip against brute force; through the strategy a boosted update still counts, scaled
down to the bound."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from replies import reply
from test_validation import NODES, _global, _trained

from fedpeft.wire import NUM_EXAMPLES, from_array_record, to_array_record
from strategies.flower import FedPeftStrategy
from strategies.norm_bound import clip_to_norm


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=3), min_size=1, max_size=4),
       st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_clip_matches_brute_force(shapes: list[list[int]], max_norm: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    update = {f"t{i}": (rng.normal(size=s) * 10.0 ** rng.integers(-2, 3)).astype(np.float32)
              for i, s in enumerate(shapes)}
    flat = np.concatenate([v.ravel().astype(np.float64) for v in update.values()])
    norm = float(np.linalg.norm(flat))
    clipped, changed = clip_to_norm(update, max_norm=max_norm)
    assert changed == (norm > max_norm * (1 + 1e-6))
    want = 1.0 if not changed else max_norm / norm
    for key, value in update.items():
        np.testing.assert_allclose(clipped[key], value * want, rtol=1e-5, atol=1e-30)
    new = float(np.linalg.norm(np.concatenate([v.ravel() for v in clipped.values()]).astype(np.float64)))
    assert new <= max_norm * (1 + 1e-5) or not changed


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_bound_must_be_positive(bad: float) -> None:
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        clip_to_norm({"a": np.ones(2, np.float32)}, max_norm=bad)


@pytest.mark.usefixtures("server_identity")
def test_a_boosted_update_is_capped_not_dropped() -> None:
    from functools import partial

    glob = _global()
    bound = 0.5
    strategy = FedPeftStrategy(aggregator="fedit", sites=NODES, fraction=1.0, seed=0,
                               bound=partial(clip_to_norm, max_norm=bound))
    messages = list(strategy.configure_train(1, to_array_record(glob), ConfigRecord({}), None))
    attacker = NODES[messages[0].metadata.dst_node_id]
    trained = {NODES[m.metadata.dst_node_id]: _trained(glob, NODES[m.metadata.dst_node_id],
                                                       scale=1e4 if i == 0 else 1.0) for i, m in enumerate(messages)}
    replies = [reply(m, trained[NODES[m.metadata.dst_node_id]], {NUM_EXAMPLES: 10}) for m in messages]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == len(NODES) and strategy.traffic[1].reclipped == {attacker}
    got = from_array_record(arrays)
    deltas = {}
    for site, state in trained.items():
        update = {k: state[k] - glob[k] for k in glob}
        deltas[site] = clip_to_norm(update, max_norm=bound)[0] if site == attacker else update
    for key in glob:  # the plain mean of the updates, the attacker's scaled to norm 0.5
        want = glob[key] + np.mean([d[key] for d in deltas.values()], axis=0)
        np.testing.assert_allclose(got[key], want, rtol=1e-5, atol=1e-6)
    attack = {k: deltas[attacker][k] for k in glob}
    assert np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in attack.values())) <= bound * (1 + 1e-5)
