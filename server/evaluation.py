"""The coordinator's own evaluator: the global adapter on the held-out test split, after every round.

It builds its model and reads its data itself (it never borrows a site's): the run's data file split as
every simulated site splits it (:func:`fedpeft.data.sources.load_split`), the test rows tokenized once,
and, in a run with probe rounds, the head's inputs kept between the rounds that leave the adapter as it
was (:class:`fedpeft.probe.FeatureCache`): a probe round's evaluation then costs no encoder pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedpeft.adapters import adapter_state, load_adapter_state
from fedpeft.config import FedPeftConfig
from fedpeft.data import LabelledTable
from fedpeft.data.sources import load_split
from fedpeft.models import build_peft_model, load_tokenizer
from fedpeft.probe import FeatureCache, evaluate_probed
from fedpeft.runtime import resolve_runtime
from fedpeft.tasks import TASKS


class Evaluator:
    """The run's model at the coordinator, its test split and labels (``label_names``, in the order the
    sites number them)."""

    def __init__(self, cfg: FedPeftConfig, *, split: tuple[LabelledTable, LabelledTable] | None = None) -> None:
        self.cfg = cfg
        train, test = split if split is not None else load_split(cfg)
        self.label_names = list(train.label_names)
        self.runtime = resolve_runtime(cfg.device, cfg.precision)
        self.tokenizer = load_tokenizer(cfg.model)
        self.model, self.initial = build_peft_model(cfg, len(self.label_names))
        self.test = TASKS.get(cfg.task).encode(self.tokenizer, test, max_length=cfg.max_length)
        self.features = FeatureCache()

    def initial_state(self) -> dict[str, np.ndarray]:
        """The seeded initial adapter every site starts from."""
        return dict(self.initial)

    def evaluate(self, state: Mapping[str, np.ndarray]) -> dict[str, float]:
        """The task's held-out metrics (``loss``, ``accuracy``; LMs: ``perplexity``) of adapter ``state``."""
        load_adapter_state(self.model, state)
        cfg = self.cfg
        if cfg.probes:
            return evaluate_probed(self.model, self.test, batch_size=cfg.eval_batch_size, runtime=self.runtime,
                                   cache=self.features)
        return TASKS.get(cfg.task).evaluate(self.model, self.test, batch_size=cfg.eval_batch_size,
                                            runtime=self.runtime)

    def loaded(self, state: Mapping[str, np.ndarray]) -> Any:
        """The model with adapter ``state`` in it (to save or to score the audit's canaries)."""
        load_adapter_state(self.model, state)
        return self.model

    def shapes_fit(self, state: Mapping[str, np.ndarray]) -> bool:
        """Whether ``state`` has the names and shapes of this model's adapter."""
        expected = adapter_state(self.model)
        return {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
