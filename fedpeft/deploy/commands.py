"""The command lines that start a SuperLink and a SuperNode the way fedpeft deploys them.

Both use Flower 1.39's gRPC-rere Fleet API with TLS and SuperNode authentication on:

- the SuperLink: ``flower-superlink`` with the CA, its certificate and key, ``--enable-supernode-auth``,
  a persistent ``--database``, and runtime dependency installation **off** (by default it would run
  ``uv sync`` on every app against the public index; the app's dependencies are installed already);
- a SuperNode: ``flower-supernode`` with the CA (to verify the link), its authentication key, and a
  node config holding its data file, its name and, optionally, its privacy budget and state directory.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedpeft.deploy.supernode import FLOWER_IDLE_SECONDS
from fedpeft.errors import FedPeftError
from fedpeft.state_dir import state_dir as default_state_dir
from fedpeft.state_dir import worker_secret_path

WORKER_KEY = "worker"  # node config: a site worker takes this node's messages (client/app.py refuses them)


def split_address(address: str, *, what: str) -> tuple[str, int]:
    """``"host:port"`` → ``(host, port)``; raises a one-line error naming ``what``."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FedPeftError(f"{what} must be HOST:PORT, got {address!r}")
    return host, int(port)


def _existing(path: str | Path, what: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FedPeftError(f"{what} not found: {file}")
    return str(file.resolve())


def superlink_command(*, certs: str | Path, state_dir: str | Path, fleet: str, control: str) -> list[str]:
    """``flower-superlink`` for a federation whose credentials ``fedpeft certs`` wrote to ``certs``.

    ``fleet`` is where SuperNodes connect (gRPC); ``control`` is the HTTPS address the ``flwr`` CLI
    submits runs to. The link's state (registered nodes, runs) lives in ``state_dir/superlink.db``.
    """
    split_address(fleet, what="--fleet")
    host, port = split_address(control, what="--control")
    root = Path(certs).expanduser()
    state = Path(state_dir).expanduser().resolve()
    return [
        "flower-superlink",
        "--ssl-ca-certfile", _existing(root / "ca.crt", "CA certificate"),
        "--ssl-certfile", _existing(root / "server.crt", "SuperLink certificate"),
        "--ssl-keyfile", _existing(root / "server.key", "SuperLink key"),
        "--enable-supernode-auth",
        "--fleet-api-type", "grpc-rere",
        "--fleet-api-address", fleet,
        "--host", host,
        "--port", str(port),
        "--database", str(state / "superlink.db"),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip


def node_config_string(values: Mapping[str, Any]) -> str:
    """Flower's ``--node-config`` syntax: space-separated ``key=value`` with TOML values."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise FedPeftError(f"node config {key} must be a string or a number, got {value!r}")
        if isinstance(value, str):
            if '"' in value or "\\" in value:
                raise FedPeftError(f"node config {key} must not contain quotes or backslashes: {value!r}")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value!r}")
    return " ".join(parts)


def supernode_command(
    *,
    link: str,
    ca: str | Path,
    key: str | Path,
    data: str | Path,
    site: str = "",
    state_dir: str | Path | None = None,
    dp_epsilon: float | None = None,
    codec: str = "",
    port: int = 9094,
    max_retries: int | None = None,
    max_wait: float | None = None,
    worker: bool = False,
    poll: float | None = None,
    device: str = "",
    precision: str = "",
) -> list[str]:
    """``flower-supernode`` for one site: its data file, name, budget and state travel as node config.

    ``worker``: a site worker serves this node: the SuperNode runs with ``--isolation process`` and the
    worker, holding the secret ``<state-dir>/worker/superexec.secret``, takes its tasks (client/worker/tasks.py);
    node config ``worker = 1`` and the state directory are always given (a ClientApp process Flower starts for
    such a node anyway refuses the message, see client/app.py).

    ``poll``: below Flower's own 3 s, the SuperNode runs through :mod:`fedpeft.deploy.supernode`, which asks the
    SuperLink for messages every ``poll`` seconds while idle.

    ``port`` is the node's local API (give nodes on one host distinct ports); ``max_retries`` /
    ``max_wait`` bound how long a refused node keeps trying (Flower retries forever by default).
    """
    split_address(link, what="--link")
    data_file = Path(_existing(data, "site data file"))
    config: dict[str, Any] = {"data-path": str(data_file), "site": site or data_file.stem}
    if state_dir is not None:
        config["state-dir"] = str(Path(state_dir).expanduser().resolve())
    if worker:
        config["state-dir"] = str(Path(state_dir or default_state_dir()).expanduser().resolve())
        config[WORKER_KEY] = 1  # a ClientApp process started anyway (not by fedpeft node) refuses, naming why
    if dp_epsilon is not None:
        if not dp_epsilon > 0:
            raise FedPeftError(f"--dp-epsilon must be > 0, got {dp_epsilon}")
        config["dp-epsilon"] = float(dp_epsilon)
    if codec:
        config["codec"] = codec
    for name, value in (("device", device), ("precision", precision)):
        if value:  # this site's hardware, over the run's setting
            config[name] = value
    if not 0 < port < 65536:
        raise FedPeftError(f"--port must be in 1..65535, got {port}")
    cmd = [
        "flower-supernode",
        "--superlink", link,
        "--root-certificates", _existing(ca, "CA certificate"),
        "--auth-supernode-private-key", _existing(key, "node key"),
        "--node-config", node_config_string(config),
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    if worker:  # no SuperExec, no per-message process: the site worker takes the node's tasks
        secret = worker_secret_path(Path(config["state-dir"]))
        cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait is not None:
        cmd += ["--max-wait-time", str(max_wait)]
    if poll is not None:
        if not poll > 0:
            raise FedPeftError(f"--poll must be > 0 seconds, got {poll}")
        if poll < FLOWER_IDLE_SECONDS:
            cmd = [sys.executable, "-m", "fedpeft.deploy.supernode", "--poll", f"{poll:g}", *cmd[1:]]
    return cmd


def printable(cmd: list[str]) -> str:
    """The command as one shell line."""
    return " ".join(shlex.quote(c) for c in cmd)
