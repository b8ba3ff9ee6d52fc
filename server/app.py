"""The ServerApp. ``flwr run .`` uses ``app`` (config from the Flower run config);
``fedpeft simulate`` builds one around an already validated config with :func:`make_server_app`."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import FedPeftConfig
from fedpeft.deploy.flower_compat import check as check_flower
from fedpeft.deploy.flower_compat import eager_reply_pulls
from fedpeft.errors import FedPeftError
from fedpeft.preflight import check_run
from privacy.modes import privacy_mode
from server.checks import check_config
from server.console import make_reporter
from server.run import run_federation

logger = logging.getLogger(__name__)


def flower_run_config(run_config: Mapping[str, Any]) -> FedPeftConfig:
    """The config of a ``flwr run``: its run config parsed and checked as ``fedpeft simulate`` checks its flags
    (each setting, how they combine, the model and the data), before any model loads. A bad value is one
    logged line and a :class:`~fedpeft.errors.FedPeftError` (the run fails with that line as its reason)."""
    try:
        cfg = FedPeftConfig.from_mapping(run_config).with_default_out()
        check_config(cfg)
        return check_run(cfg, clients_given=True, here=False, partitions=False)
    except FedPeftError as err:
        logger.error("fedpeft: error: %s", err)
        raise FedPeftError(str(err)) from None


def make_server_app(
    cfg: FedPeftConfig | None = None,
    *,
    on_error: Callable[[BaseException], None] | None = None,
    output: str = "table",
) -> ServerApp:
    """A ServerApp running fedpeft with ``cfg`` (or, when None, the Flower run config), reporting rounds
    as ``output`` (:mod:`server.console`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        check_flower()  # the Flower internals fedpeft relies on, each verified (fedpeft/deploy/flower_compat.py)
        run_cfg = cfg if cfg is not None else flower_run_config(context.run_config)
        eager_reply_pulls(grid)
        try:
            with make_reporter(output, run_cfg.rounds, dp=privacy_mode(run_cfg).private) as reporter:
                run_federation(grid, run_cfg, on_round=reporter, clients_from_federation=cfg is None)
        except BaseException as err:  # handed to the CLI, which prints one line
            if on_error is None:
                raise
            on_error(err)

    return app


app = make_server_app()
