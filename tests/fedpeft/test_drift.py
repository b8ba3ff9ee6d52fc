"""Drift correction at the sites: FedProx's proximal term and SCAFFOLD's control variates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from fedpeft.drift import DriftSpec, parse_drift
from fedpeft.drift.fedprox import ProximalTerm
from fedpeft.drift.scaffold import ControlTerm
from fedpeft.errors import FedPeftError
from fedpeft.training import HeadInputs, train_local
from strategies.scaffold import control_rejection, server_variate


@pytest.mark.parametrize(("spec", "parsed"), [
    ("none", DriftSpec()), ("scaffold", DriftSpec("scaffold")), ("fedprox:0.01", DriftSpec("fedprox", 0.01)),
    ("fedprox:0", DriftSpec("fedprox", 0.0)),
])
def test_parse(spec: str, parsed: DriftSpec) -> None:
    assert parse_drift(spec) == parsed


@pytest.mark.parametrize("spec", ["fedprox", "fedprox:", "fedprox:-1", "fedprox:nan", "scaffold:1", "prox", ""])
def test_parse_rejects(spec: str) -> None:
    with pytest.raises(FedPeftError, match="drift must be"):
        parse_drift(spec)


class Quadratic(torch.nn.Module):
    """f(w) = mean over examples of k/2·‖w − x‖², k the example's integer label: a site's curvature.

    A site whose examples all sit at a with curvature k has its optimum at a; two sites of different
    curvature have a joint optimum that is *not* the midpoint of their optima, which is where FedAvg
    with many local steps ends up (client drift)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> SequenceClassifierOutput:
        k = labels.float().unsqueeze(-1)
        return SequenceClassifierOutput(loss=(0.5 * k * (self.w - features) ** 2).sum(-1).mean())


SITES = [HeadInputs(torch.tensor([[1.0, 0.0]] * 8), np.full(8, 1)),  # optimum (1, 0), curvature 1
         HeadInputs(torch.tensor([[-1.0, 2.0]] * 8), np.full(8, 9))]  # optimum (-1, 2), curvature 9
OPTIMUM = np.array([(1 * 1.0 + 9 * -1.0) / 10, (1 * 0.0 + 9 * 2.0) / 10])  # of the sum: (-0.8, 1.8)


def _federate(rounds: int, *, scaffold: bool, prox: float = 0.0) -> np.ndarray:
    model = Quadratic()
    x = np.zeros(2, np.float32)
    c: dict[str, np.ndarray] = {}
    ci: list[dict[str, np.ndarray]] = [{}, {}]
    for rnd in range(rounds):
        ys, changes = [], []
        for i, data in enumerate(SITES):
            model.w.data = torch.tensor(x)
            terms: list = []
            if scaffold:
                terms.append(ControlTerm([model.w], ["w"], server=c, site=ci[i]))
            if prox:
                terms.append(ProximalTerm([model.w], mu=prox))
            train_local(model, data, epochs=20, max_steps=0, batch_size=8, lr=0.05, weight_decay=0.0,
                        seed=rnd, gradient_terms=terms)
            ys.append(model.w.detach().numpy().copy())
            if scaffold:
                new = terms[0].site_variate()
                changes.append({k: v - ci[i].get(k, 0.0) for k, v in new.items()})
                ci[i] = new
        x = np.mean(ys, axis=0).astype(np.float32)
        if scaffold:
            c = server_variate(c, changes, population=2)
    return x


def test_scaffold_removes_the_drift_fedavg_shows() -> None:
    fedavg = _federate(30, scaffold=False)
    scaffold = _federate(30, scaffold=True)
    drift = np.linalg.norm(fedavg - OPTIMUM)
    assert drift > 0.5  # FedAvg settles between the sites' own optima: (0, 1), not (-0.8, 1.8)
    assert np.linalg.norm(scaffold - OPTIMUM) < 0.1 * drift


def test_a_strong_proximal_term_keeps_a_site_near_the_broadcast() -> None:
    def moved(mu: float) -> float:
        model = Quadratic()
        terms = [ProximalTerm([model.w], mu=mu)] if mu else []
        train_local(model, SITES[1], epochs=20, max_steps=0, batch_size=8, lr=0.05, weight_decay=0.0, seed=0,
                    gradient_terms=terms)
        return float(model.w.detach().norm())

    assert moved(100.0) < 0.2 * moved(0.0)


def test_proximal_term_is_mu_times_the_distance() -> None:
    w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    term = ProximalTerm([w], mu=0.5)
    w.data += torch.tensor([2.0, -4.0])
    w.grad = torch.tensor([0.1, 0.1])
    term([w])
    torch.testing.assert_close(w.grad, torch.tensor([1.1, -1.9]))
    with pytest.raises(ValueError):
        ProximalTerm([w], mu=0.0)


def test_control_term_shifts_by_c_minus_ci_and_records_raw_gradients() -> None:
    w = torch.nn.Parameter(torch.zeros(2))
    term = ControlTerm([w], ["w"], server={"w": np.array([1.0, 1.0])}, site={"w": np.array([0.25, 0.0])})
    for g in ([2.0, 0.0], [0.0, 4.0]):
        w.grad = torch.tensor(g)
        term([w])
        torch.testing.assert_close(w.grad, torch.tensor(g) + torch.tensor([0.75, 1.0]))
    np.testing.assert_allclose(term.site_variate()["w"], [1.0, 2.0])  # the mean raw gradient


def test_server_variate_adds_the_mean_change_over_all_sites() -> None:
    c = {"w": np.array([1.0, 0.0], np.float32)}
    new = server_variate(c, [{"w": np.array([2.0, 2.0])}, {"w": np.array([2.0, -2.0]), "v": np.ones(1)}],
                         population=4)
    np.testing.assert_allclose(new["w"], [2.0, 0.0])
    np.testing.assert_allclose(new["v"], [0.25])


@pytest.mark.parametrize(("change", "reason"), [
    (None, "lacks"), ({"x": np.zeros(2)}, "does not train"), ({"w": np.zeros(3)}, "shape"),
    ({"w": np.array([np.nan, 0.0])}, "not finite"),
])
def test_a_bad_control_change_is_rejected_with_a_reason(change: dict | None, reason: str) -> None:
    assert reason in control_rejection(change, {"w": (2,)})
    assert control_rejection({"w": np.zeros(2)}, {"w": (2,)}) is None


def test_terms_match_parameters_by_identity_not_order() -> None:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    other = torch.nn.Parameter(torch.zeros(4))
    control = ControlTerm([a, b], ["a", "b"], server={"a": np.ones(2), "b": np.full(3, 2.0)}, site={})
    prox = ProximalTerm([a, b], mu=1.0)
    b.data += 1.0
    for p in (a, b, other):
        p.grad = torch.zeros_like(p)
    control([other, b, a])  # another order, and a parameter the term does not cover
    prox([b, other, a])
    torch.testing.assert_close(a.grad, torch.ones(2))
    torch.testing.assert_close(b.grad, torch.full((3,), 3.0))
    torch.testing.assert_close(other.grad, torch.zeros(4))
