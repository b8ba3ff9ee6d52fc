"""The ServerApp. ``flwr run .`` uses ``app`` (config from the Flower run config);
``fedpeft simulate`` builds one around an already validated config with :func:`make_server_app`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpeft.config import FedPeftConfig
from fedpeft.deploy.objects import eager_object_pulls
from server.console import make_reporter
from server.run import run_federation


def eager_reply_pulls(grid: Grid) -> bool:
    """A deployed grid pulls a site's reply objects the way :mod:`fedpeft.deploy.objects` says: a reply seen
    before its objects finished uploading is asked for again after 0.05 s, not 1 s. Simulation's in-memory
    grid pulls nothing (False)."""
    module = sys.modules.get(type(grid).__module__)
    return module is not None and eager_object_pulls(module)


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
        run_cfg = cfg if cfg is not None else FedPeftConfig.from_mapping(context.run_config).with_default_out()
        eager_reply_pulls(grid)
        try:
            with make_reporter(output, run_cfg.rounds, dp=run_cfg.dp != "off") as reporter:
                run_federation(grid, run_cfg, on_round=reporter, clients_from_federation=cfg is None)
        except BaseException as err:  # handed to the CLI, which prints one line
            if on_error is None:
                raise
            on_error(err)

    return app


app = make_server_app()
