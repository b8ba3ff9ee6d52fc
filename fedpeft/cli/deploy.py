"""``fedpeft certs | link | node | connection``: credentials, and one command each for a coordinator and a site."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path

from fedpeft.codecs import CodecError, parse_codec
from fedpeft.config_checks import DEVICES, PRECISIONS
from fedpeft.deploy import flower_compat
from fedpeft.deploy.commands import printable, superlink_command, supernode_command
from fedpeft.deploy.connection import add_connection
from fedpeft.deploy.supervise import supervise, worker_command
from fedpeft.errors import FedPeftError

SUPEREXEC_POLL_SECONDS = 0.2  # --no-worker: Flower's SuperExec looks for a task this often (Flower: 1 s)
DEFAULT_POLL = 0.5  # fedpeft node's SuperNode idle poll, seconds (Flower's: 3)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser(
        "certs",
        help="make the CA, the SuperLink's TLS certificate and a key pair per site",
        description="Write OUT_DIR/ca.crt, ca.key, server.crt, server.key and nodes/<site>.key + .pub (EC P-384, "
        "OpenSSH: what Flower's SuperNode authentication expects). Private keys are 0600. Existing keys are "
        "never replaced without --force; an existing CA is reused (so sites can be added later).",
    )
    certs.add_argument("out_dir", metavar="OUT_DIR")
    certs.add_argument("--san", action="append", default=None, metavar="HOST_OR_IP",
                       help="a host name or IP the SuperLink is reached at (repeat; default: localhost, 127.0.0.1)")
    certs.add_argument("--node", action="append", default=[], metavar="SITE", help="a site to make a key pair for "
                       "(repeat)")
    certs.add_argument("--force", action="store_true", help="replace the SuperLink certificate and named node keys")

    link = sub.add_parser(
        "link",
        help="start the coordinator's SuperLink (TLS, node authentication, gRPC Fleet API)",
        description="Run flower-superlink with the credentials of `fedpeft certs`: TLS on, --enable-supernode-auth, "
        "the gRPC-rere Fleet API at --fleet, the HTTPS Control API (for `flwr run`) at --control, registrations and "
        "runs kept in STATE_DIR/superlink.db, runtime dependency installation off.",
    )
    link.add_argument("--certs", required=True, metavar="DIR", help="the directory `fedpeft certs` wrote")
    link.add_argument("--state-dir", required=True, metavar="DIR", help="where the SuperLink keeps its database")
    link.add_argument("--fleet", default="0.0.0.0:9092", metavar="HOST:PORT", help="Fleet API, for SuperNodes "
                      "(default: 0.0.0.0:9092)")
    link.add_argument("--control", default="127.0.0.1:9093", metavar="HOST:PORT", help="Control API, for `flwr "
                      "run` (default: 127.0.0.1:9093)")
    link.add_argument("--print", action="store_true", help="print the flower-superlink command instead of running it")

    node = sub.add_parser(
        "node",
        help="start a site's SuperNode: its own data file, its key, TLS to the SuperLink",
        description="Run flower-supernode for this site: it verifies the SuperLink with the CA certificate, "
        "authenticates with its own key (registered on the SuperLink with `flwr supernode register`), and trains on "
        "DATA (never on a partition of someone else's data). --dp-epsilon caps this site's privacy budget in runs "
        "with --dp local.",
    )
    node.add_argument("--link", required=True, metavar="HOST:PORT", help="the SuperLink's Fleet API address")
    node.add_argument("--ca", required=True, metavar="FILE", help="the federation's CA certificate (ca.crt)")
    node.add_argument("--key", required=True, metavar="FILE", help="this site's private key (nodes/<site>.key)")
    node.add_argument("--data", required=True, metavar="FILE", help="this site's training data (JSONL/CSV/...)")
    node.add_argument("--name", default="", metavar="SITE", help="this site's name (default: the data file's stem)")
    node.add_argument("--dp-epsilon", type=float, default=None, metavar="EPS",
                      help="this site's epsilon budget under --dp local (default: the run's)")
    node.add_argument("--state-dir", default=None, metavar="DIR", help="privacy account, ledger key, codec residual "
                      "(default: $FEDPEFT_STATE_DIR or ~/.fedpeft/state)")
    node.add_argument("--codec", default="", metavar="SPEC", help="this site's update codec (default: the run's)")
    node.add_argument("--port", type=int, default=9094, help="the node's local API port (default: 9094; one per "
                      "node on a host)")
    node.add_argument("--max-retries", type=int, default=None, help="give up after this many connection attempts")
    node.add_argument("--max-wait", type=float, default=None, metavar="SECONDS", help="give up after this long")
    node.add_argument("--no-worker", action="store_true", help="no site worker: Flower's per-message process loads "
                      "the model and data for every message (the default keeps them in one long-lived worker)")
    node.add_argument("--device", choices=DEVICES, default=None,
                      help="where this site trains, over the run's device (default: the run's)")
    node.add_argument("--precision", choices=PRECISIONS, default=None,
                      help="this site's precision, over the run's (default: the run's)")
    node.add_argument("--poll", type=float, default=DEFAULT_POLL, metavar="SECONDS",
                      help=f"while idle, ask the SuperLink for a message this often (default: {DEFAULT_POLL:g}; "
                      "3 or more: Flower's own SuperNode, which waits 3 s, unpatched)")
    node.add_argument("--print", action="store_true", help="print the commands instead of running them")

    conn = sub.add_parser(
        "connection",
        help="add a SuperLink connection to the flwr CLI's config, for `flwr run . NAME`",
        description="Add [superlink.NAME] (address = CONTROL, root-certificates = CA) to $FLWR_HOME/config.toml "
        "(default ~/.flwr), creating the file if needed.",
    )
    conn.add_argument("name", metavar="NAME")
    conn.add_argument("--control", required=True, metavar="HOST:PORT", help="the SuperLink's Control API address")
    conn.add_argument("--ca", required=True, metavar="FILE", help="the federation's CA certificate")
    conn.add_argument("--default", action="store_true", help="make it the flwr CLI's default connection")


def run_certs(args: argparse.Namespace) -> int:
    # deferred: heavy (cryptography) on the CLI start-up path
    from fedpeft.deploy.certs import DEFAULT_SANS, write_credentials

    made = write_credentials(args.out_dir, sans=args.san or DEFAULT_SANS, nodes=args.node, force=args.force)
    print(f"fedpeft: CA {made.ca_cert}; SuperLink certificate {made.server_cert} "
          f"for {', '.join(args.san or DEFAULT_SANS)}")
    for site, key in made.node_keys.items():
        print(f"fedpeft: {site}: private key {key} (give it to the site), public key {made.node_public_keys[site]}")
    return 0


def _exec(cmd: list[str], *, dry_run: bool) -> int:
    print(printable(cmd), flush=True)
    if dry_run:
        return 0
    if shutil.which(cmd[0]) is None:
        raise FedPeftError(f"{cmd[0]} not found on PATH; install flwr[simulation]>=1.39,<1.40")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    sys.stdout.flush()
    os.execvp(cmd[0], cmd)
    return 0  # pragma: no cover - exec does not return


def run_link(args: argparse.Namespace) -> int:
    flower_compat.check()  # the Flower internals fedpeft relies on (the ServerApp's among them), each verified
    cmd = superlink_command(certs=args.certs, state_dir=args.state_dir, fleet=args.fleet, control=args.control)
    if not args.print:
        Path(args.state_dir).expanduser().mkdir(parents=True, exist_ok=True)
    return _exec(cmd, dry_run=args.print)


def run_node(args: argparse.Namespace) -> int:
    flower_compat.check()  # the Flower internals the SuperNode's patches and the site worker rely on, each verified
    cmd = supernode_command(
        link=args.link, ca=args.ca, key=args.key, data=args.data, site=args.name, state_dir=args.state_dir,
        dp_epsilon=args.dp_epsilon, codec=args.codec, port=args.port, max_retries=args.max_retries,
        max_wait=args.max_wait, worker=not args.no_worker, poll=args.poll, device=args.device or "",
        precision=args.precision or "",
    )
    if args.codec:
        try:
            parse_codec(args.codec)
        except CodecError as err:
            raise FedPeftError(f"--codec: {err}") from None
    if args.no_worker:
        # the SuperNode's SuperExec looks for a pulled message once a second by default: a round would wait
        # 0.5 s on average for the ClientApp's process to be started
        flower_compat.superexec_task_poll(SUPEREXEC_POLL_SECONDS)
        return _exec(cmd, dry_run=args.print)
    state = Path(node_config_value(cmd, "state-dir"))
    runtime_api = f"127.0.0.1:{args.port}"  # the SuperNode's Runtime API (supernode_command's --host/--port)
    print(printable(worker_command(state, runtime_api)), flush=True)
    print(printable(cmd), flush=True)
    if args.print:
        return 0
    if shutil.which(cmd[0]) is None:
        raise FedPeftError(f"{cmd[0]} not found on PATH; install flwr[simulation]>=1.39,<1.40")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    return supervise(cmd, state, runtime_api)


def node_config_value(cmd: list[str], key: str) -> str:
    """A string value of the ``--node-config`` in a flower-supernode command."""
    for part in shlex.split(cmd[cmd.index("--node-config") + 1]):
        name, _, value = part.partition("=")
        if name == key:
            return value.strip('"')
    raise KeyError(key)


def run_connection(args: argparse.Namespace) -> int:
    path = add_connection(args.name, control=args.control, ca=args.ca, make_default=args.default)
    print(f"fedpeft: connection {args.name!r} added to {path}; submit with: flwr run . {args.name} --stream")
    return 0
