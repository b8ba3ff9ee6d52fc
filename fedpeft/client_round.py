"""One client-round at a site: what ``cfg`` says a site does with the broadcast adapter and its data.

:func:`train_client_round` trains a probe round (the head alone, on pooled features: :mod:`fedpeft.probe`)
or an adapter round (:func:`fedpeft.training.train_local`), seeded by (run seed, round, partition), with
the run's label correction (:mod:`fedpeft.label_correction`) and drift correction (:mod:`fedpeft.drift`)
in the local loss. DP-SGD rounds (:mod:`privacy.local`) take the same settings
(:func:`train_settings`, :func:`probe_settings`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from fedpeft.adapters.state import key_matches, state_names
from fedpeft.config import FedPeftConfig
from fedpeft.drift import DriftSpec, resolve_drift
from fedpeft.drift.fedprox import ProximalTerm
from fedpeft.drift.scaffold import ControlTerm
from fedpeft.errors import FedPeftError
from fedpeft.label_correction import label_counts, logit_offsets, parse_label_correction
from fedpeft.probe import FeatureCache, HeadProbe, head_inputs, head_module, probe_plan
from fedpeft.runtime import Runtime, resolve_runtime
from fedpeft.site import derive_seed
from fedpeft.training import Encoded, GradientTerm, train_local


def runtime(cfg: FedPeftConfig) -> Runtime:
    """Where this process trains and evaluates (:func:`fedpeft.runtime.resolve_runtime`)."""
    return resolve_runtime(cfg.device, cfg.precision)


def train_client_round(
    cfg: FedPeftConfig,
    model: Any,
    data: Encoded,
    *,
    server_round: int,
    partition_id: int,
    frozen: tuple[str, ...] = (),
    control: Control | None = None,
    drift: DriftSpec | None = None,
    features: FeatureCache | None = None,
) -> dict[str, float]:
    """One client-round of local training as ``cfg`` configures it, seeded by (seed, round, partition).

    Parameters whose names contain a ``frozen`` path component (``"lora_A"``) are not trained. The
    first ``cfg.probes`` rounds train the head alone on pooled features (:mod:`fedpeft.probe`).
    The local loss takes the run's label correction (:mod:`fedpeft.label_correction`) and its drift
    term (``drift``, a :class:`fedpeft.drift.DriftSpec`; None: the run's own without DP); under SCAFFOLD
    ``control`` holds the variates c and c_i, and receives the site's new c_i⁺ (``control.updated``);
    without it (a site trained alone) SCAFFOLD adds nothing. ``features``: where the site keeps its head
    inputs between probe rounds (:class:`fedpeft.probe.FeatureCache`).
    """
    seed = derive_seed(cfg.seed, server_round, partition_id)
    offset = label_offset(cfg, data, model)
    if server_round <= cfg.probes:
        settings = probe_settings(cfg, len(data))
        inputs = head_inputs(model, data, batch_size=settings.pop("feature_batch_size"), runtime=settings["runtime"],
                             cache=features)
        probe = HeadProbe(head_module(model))
        terms = drift_terms(cfg, model, probe, control, drift)
        result = train_local(probe, inputs, **settings, seed=seed, logit_offset=offset, gradient_terms=terms)
    else:
        with frozen_parameters(model, frozen):
            terms = drift_terms(cfg, model, model, control, drift)
            result = train_local(model, data, **train_settings(cfg), seed=seed, logit_offset=offset,
                                 gradient_terms=terms)
    if control is not None:
        control.updated = next(t.site_variate() for t in terms if hasattr(t, "site_variate"))
    return result


@dataclasses.dataclass
class Control:
    """SCAFFOLD's variates for one client-round: the coordinator's c and the site's c_i (by adapter-state
    name); after training, ``updated`` holds c_i⁺ for the tensors the round trained."""

    server: dict[str, np.ndarray]
    site: dict[str, np.ndarray]
    updated: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


def label_offset(cfg: FedPeftConfig, data: Encoded, model: Any) -> np.ndarray | None:
    """The logit offsets of the run's label correction at a site holding ``data`` (None: no correction)."""
    method, tau = parse_label_correction(cfg.label_correction)
    if method == "none" or cfg.task != "seq-cls":
        return None
    return logit_offsets(label_counts(data.labels, model.config.num_labels), method=method, tau=tau)


def drift_terms(cfg: FedPeftConfig, model: Any, trained: Any, control: Control | None,
                spec: DriftSpec | None = None) -> list[GradientTerm]:
    """The gradient terms of drift correction ``spec`` (None: the run's own without DP) over the trainable
    parameters of ``trained`` (``model`` itself, or its head alone in a probe round)."""
    spec = spec if spec is not None else resolve_drift(cfg)
    params = [p for p in trained.parameters() if p.requires_grad]
    if spec.method == "fedprox" and spec.mu > 0:
        return [ProximalTerm(params, mu=spec.mu)]
    if spec.method == "scaffold" and control is not None:  # without variates (one site alone): no term
        named = [(p, name) for p, name in zip(params, state_names(model, params), strict=True)
                 if not spec.scope or key_matches(name, spec.scope)]
        return [ControlTerm([p for p, _ in named], [name for _, name in named], server=control.server,
                            site=control.site)]
    return []


def train_settings(cfg: FedPeftConfig) -> dict[str, Any]:
    """The local-training keywords ``cfg`` sets, shared by plain and DP-SGD client-rounds."""
    return {
        "epochs": cfg.local_epochs,
        "max_steps": cfg.max_local_steps,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "head_lr": cfg.head_lr,
        "weight_decay": cfg.weight_decay,
        "runtime": runtime(cfg),
    }


def probe_settings(cfg: FedPeftConfig, num_examples: int) -> dict[str, Any]:
    """The training keywords of a probe round at a site of ``num_examples`` (plain or DP-SGD), plus
    ``feature_batch_size``: how many examples one feature-extraction pass takes."""
    return {
        **probe_plan(num_examples, batch_size=cfg.probe_batch_size, steps=cfg.probe_steps),
        "lr": cfg.probe_lr,
        "weight_decay": cfg.weight_decay,
        "runtime": runtime(cfg),
        "feature_batch_size": cfg.eval_batch_size,
    }


@contextmanager
def frozen_parameters(model: Any, components: tuple[str, ...]) -> Iterator[None]:
    """Turn off ``requires_grad`` of the matching trainable parameters for the block, then restore it
    (the model is shared by every site and strategy this process serves)."""
    hit = [p for name, p in model.named_parameters() if p.requires_grad and key_matches(name, components)]
    if components and not hit:
        raise FedPeftError(f"no trainable parameter matches the frozen components {list(components)}")
    for p in hit:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in hit:
            p.requires_grad_(True)
