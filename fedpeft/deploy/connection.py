"""A SuperLink connection for the ``flwr`` CLI: a ``[superlink.NAME]`` section in ``$FLWR_HOME/config.toml``.

Flower 1.39 reads its connections from that file (``flwr run . NAME``): ``address`` is the SuperLink's
Control API and ``root-certificates`` the CA that verifies it. A new file starts with Flower's own
defaults (``local`` simulation), so nothing the CLI expects goes missing.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

from fedpeft.deploy.commands import split_address
from fedpeft.errors import FedPeftError
from fedpeft.runlog import atomic_write_text

FLOWER_DEFAULT = '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def flwr_home() -> Path:
    """``$FLWR_HOME``, else ``~/.flwr`` (where the flwr CLI looks)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def add_connection(name: str, *, control: str, ca: str | Path, make_default: bool = False) -> Path:
    """Append ``[superlink.NAME]`` to the flwr CLI's config; return the file's path.

    Raises
    ------
    FedPeftError
        A bad name or address, a missing CA file, an unreadable config, or a connection of that name.
    """
    if not NAME.match(name):
        raise FedPeftError(f"connection name {name!r} must be letters, digits, '_' or '-'")
    split_address(control, what="--control")
    ca_file = Path(ca).expanduser()
    if not ca_file.is_file():
        raise FedPeftError(f"CA certificate not found: {ca_file}")
    path = flwr_home() / "config.toml"
    text = path.read_text() if path.exists() else FLOWER_DEFAULT
    try:
        current = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise FedPeftError(f"{path} is not valid TOML: {err}") from None
    if name in current.get("superlink", {}):
        raise FedPeftError(f"{path} already has a connection named {name!r}; choose another name")
    if make_default:
        if "default" not in current.get("superlink", {}):
            raise FedPeftError(f"{path} has no [superlink] default to change; edit it by hand")
        text = re.sub(r'(?m)^(default\s*=\s*)"[^"]*"', lambda m: f'{m.group(1)}"{name}"', text, count=1)
    section = f'\n[superlink.{name}]\naddress = "{control}"\nroot-certificates = "{ca_file.resolve()}"\n'
    new = text.rstrip("\n") + "\n" + section
    tomllib.loads(new)  # still valid
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, new)
    return path
