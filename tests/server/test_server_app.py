"""The ServerApp under ``flwr run``: a run config that cannot run fails in one logged line, before a model
loads or a round starts (``fedpeft simulate`` checks its flags the same way, in :mod:`server.checks`)."""

from __future__ import annotations

import logging
from unittest.mock import MagicMock

import pytest
from flwr.app import Context, RecordDict

import fedpeft.models
import server.app
import server.run
from fedpeft.errors import FedPeftError


@pytest.fixture
def nothing_may_load(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def refuse(name: str):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran for a config that cannot run")
        return called

    for module, name in ((fedpeft.models, "load_model"), (fedpeft.models, "build_peft_model"),
                         (server.app, "run_federation"), (server.run, "run_federation")):
        monkeypatch.setattr(module, name, refuse(name))
    return calls


@pytest.mark.parametrize(("run_config", "reason"), [
    ({"lora-r": -4}, "lora_r"),
    ({"strategy": "fedaverage"}, "strategy"),
    ({"drift": "scaffold", "dp": "local", "dp-epsilon": 8.0}, "drift scaffold under local DP"),
    ({"strategy": "lora-fair", "client-ranks": "2,8"}, "use exact-svd for mixed ranks"),
    ({"probe-rounds": 9, "rounds": 3}, "probe"),
])
def test_a_bad_run_config_fails_in_one_line_before_a_model_loads(
        run_config: dict, reason: str, nothing_may_load: list[str], caplog: pytest.LogCaptureFixture) -> None:
    app = server.app.make_server_app()
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with caplog.at_level(logging.ERROR, logger="server.app"), pytest.raises(FedPeftError) as err:
        app(MagicMock(), context)
    assert reason in str(err.value) and "\n" not in str(err.value)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"fedpeft: error: {err.value}"]
    assert nothing_may_load == []


def test_a_good_run_config_reaches_the_federation(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(server.app, "run_federation", lambda grid, cfg, **kw: seen.append(cfg))
    monkeypatch.setattr(server.app, "eager_reply_pulls", lambda grid: None)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={"rounds": 2, "lora-r": 4})
    server.app.make_server_app()(MagicMock(), context)
    (cfg,) = seen
    assert cfg.rounds == 2 and cfg.lora_r == 4
