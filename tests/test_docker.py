"""docker/: what can be checked without a Docker engine (none runs on our machines).

The compose file parses and wires one SuperLink, a registration step and two SuperNodes; every
``fedpeft`` command in it or in the images' entry points is accepted by the real CLI parser; each site
container mounts only its own key; the Dockerfiles copy only paths that exist and pin torch like the
README. Building the images and running the compose file were not done here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from fedpeft.cli.main import build_parser

DOCKER = Path(__file__).resolve().parents[1] / "docker"
ROOT = DOCKER.parent


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def stages(dockerfile: Path) -> dict[str, str]:
    """Stage name → its text."""
    text = dockerfile.read_text()
    parts = re.split(r"(?m)^FROM ", text)[1:]
    return {(re.search(r" AS (\S+)", p.splitlines()[0]) or [None, f"stage{i}"])[1]: p for i, p in enumerate(parts)}


def entrypoint(stage_text: str) -> list[str]:
    match = re.search(r'(?m)^ENTRYPOINT (\[.*\])$', stage_text)
    assert match, "stage has no ENTRYPOINT"
    return yaml.safe_load(match.group(1))


def fedpeft_commands(shell: str) -> list[list[str]]:
    """The `fedpeft ...` commands inside a shell string."""
    out = []
    for part in re.split(r"&&|\|\||;|\{|\}", shell.replace("$$", "$")):
        words = shlex.split(part.strip())
        if words and words[0] == "fedpeft":
            out.append(words[1:])
    return out


def test_compose_wires_a_link_and_two_sites(compose: dict) -> None:
    services = compose["services"]
    assert {"certs", "superlink", "register", "site-a", "site-b", "submit"} <= set(services)
    link = services["superlink"]
    assert link["build"]["target"] == "superlink" and "9092:9092" in link["ports"]
    for site in ("site-a", "site-b"):
        service = services[site]
        assert service["build"]["target"] == "supernode"
        assert service["depends_on"]["register"]["condition"] == "service_completed_successfully"
        mounts = [m for m in service["volumes"] if isinstance(m, dict) and m["source"] == "certs"]
        assert mounts == [{"type": "volume", "source": "certs", "target": f"/certs/{site}", "read_only": True,
                           "volume": {"subpath": site}}]  # its own key and the CA, nobody else's key
        assert not [m for m in service["volumes"] if isinstance(m, str) and m.startswith("certs:")]
    dockerfile_stages = stages(DOCKER / "Dockerfile")
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in dockerfile_stages
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).resolve().is_file()


def test_every_fedpeft_command_is_accepted_by_the_cli(compose: dict) -> None:
    parser = build_parser()
    dockerfile_stages = stages(DOCKER / "Dockerfile")
    seen = set()
    for name, service in compose["services"].items():
        if "entrypoint" in service and service["entrypoint"][:2] == ["sh", "-c"]:
            commands = fedpeft_commands(service["command"][0])
        else:
            base = entrypoint(dockerfile_stages[service["build"]["target"]])
            assert base[0] == "fedpeft", name
            commands = [base[1:] + service["command"]]
        for args in commands:
            parser.parse_args(args)  # exits (fails the test) on an unknown flag or a bad value
            seen.add(args[0])
    assert seen == {"certs", "link", "node", "connection"}
    link_stage = dockerfile_stages["superlink"]
    parser.parse_args(entrypoint(link_stage)[1:] + yaml.safe_load(re.search(r"(?m)^CMD (\[.*\])$",
                                                                             link_stage).group(1)))


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_copy_what_exists_and_pin_torch(name: str) -> None:
    text = (DOCKER / name).read_text()
    for line in re.findall(r"(?m)^COPY (.+)$", text):
        *sources, _ = line.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
    assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/" in text
    assert "torch==2.13.0" in (ROOT / "README.md").read_text()
    assert re.search(r"(?m)^USER fedpeft$", text)  # not root
    for package in ("fedpeft", "client", "server", "strategies", "privacy"):
        assert f"COPY {package} ./{package}" in text
