"""Deployment pieces without processes: credentials (formats Flower accepts, permissions, no silent
overwrite), the SuperLink/SuperNode command lines, the flwr CLI connection, and a site's own data."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedpeft.deploy.certs import make_node_key, write_credentials
from fedpeft.deploy.commands import node_config_string, superlink_command, supernode_command
from fedpeft.deploy.connection import add_connection
from fedpeft.deploy.flower_compat import PULL_REBINDS, eager_object_pulls
from fedpeft.deploy.objects import FIRST_RETRY
from fedpeft.errors import FedPeftError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_credentials_have_the_formats_flower_expects(tmp_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    made = write_credentials(tmp_path / "c", sans=["link.example.org", "10.0.0.7"], nodes=["site-a", "site-b"])
    ca = x509.load_pem_x509_certificate(made.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(made.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # signed by the CA
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["link.example.org"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    key = serialization.load_pem_private_key(made.server_key.read_bytes(), password=None)  # unencrypted PEM
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    for site in ("site-a", "site-b"):
        private = made.node_keys[site].read_bytes()
        assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        node = serialization.load_ssh_private_key(private, password=None)
        assert isinstance(node, ec.EllipticCurvePrivateKey) and node.curve.name == "secp384r1"
        public = made.node_public_keys[site].read_text()
        assert public.startswith("ecdsa-sha2-nistp384 ") and public.count("\n") == 1
        assert serialization.load_ssh_public_key(public.encode()).public_numbers() == node.public_key().public_numbers()
    for private in (made.ca_key, made.server_key, *made.node_keys.values()):
        assert mode(private) == 0o600, private
    for public in (made.ca_cert, made.server_cert, *made.node_public_keys.values()):
        assert mode(public) == 0o644, public
    assert not [p for p in (tmp_path / "c").rglob(".*tmp*")]  # no temporary files left behind


def test_existing_keys_are_never_replaced_without_force(tmp_path: Path) -> None:
    first = write_credentials(tmp_path, nodes=["site-a"])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FedPeftError, match=r"nodes/site-a.key, nodes/site-a.pub already exist .* --force"):
        write_credentials(tmp_path, nodes=["site-a"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    forced = write_credentials(tmp_path, nodes=["site-a"], force=True)
    assert forced.node_keys["site-a"].read_bytes() != before[first.node_keys["site-a"]]
    assert forced.ca_key.read_bytes() == before[first.ca_key]  # the CA is kept, even with --force
    assert forced.server_cert.read_bytes() != before[first.server_cert]  # re-issued by that CA


def test_a_site_added_later_reuses_the_ca_and_the_link_certificate(tmp_path: Path) -> None:
    write_credentials(tmp_path, nodes=["site-a"])
    before = {name: (tmp_path / name).read_bytes() for name in ("ca.crt", "ca.key", "server.crt", "server.key")}
    made = write_credentials(tmp_path, nodes=["site-c"])
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert made.node_keys["site-c"].is_file() and (tmp_path / "nodes" / "site-a.key").is_file()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"nodes": ["../evil"]}, "node name '../evil' must be"),
    ({"nodes": ["a", "a"]}, "each --node name must be given once"),
    ({"sans": ["bad host!"]}, "--san 'bad host!' is neither an IP address nor a host name"),
    ({"sans": []}, "needs at least one --san"),
])
def test_bad_credential_requests_fail_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(FedPeftError, match=message):
        write_credentials(tmp_path / "c", **kwargs)
    assert not any((tmp_path / "c").rglob("*.key")) if (tmp_path / "c").exists() else True


def test_half_a_ca_is_refused(tmp_path: Path) -> None:
    write_credentials(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(FedPeftError, match="only half of a CA"):
        write_credentials(tmp_path, nodes=["site-a"])


def test_node_keys_differ() -> None:
    assert make_node_key()[1] != make_node_key()[1]


def test_superlink_command_turns_on_tls_auth_grpc_and_turns_off_installs(tmp_path: Path) -> None:
    write_credentials(tmp_path / "c")
    cmd = superlink_command(certs=tmp_path / "c", state_dir=tmp_path / "s", fleet="0.0.0.0:9092",
                            control="127.0.0.1:9093")
    flags = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "flower-superlink"
    assert {"--enable-supernode-auth", "--disable-runtime-dependency-installation"} <= set(cmd)
    assert "--insecure" not in cmd
    i = cmd.index("--fleet-api-type")
    assert cmd[i + 1] == "grpc-rere" and cmd[cmd.index("--fleet-api-address") + 1] == "0.0.0.0:9092"
    assert cmd[cmd.index("--ssl-ca-certfile") + 1] == str((tmp_path / "c" / "ca.crt").resolve())
    assert cmd[cmd.index("--database") + 1] == str((tmp_path / "s" / "superlink.db").resolve())
    assert (cmd[cmd.index("--host") + 1], cmd[cmd.index("--port") + 1]) == ("127.0.0.1", "9093")
    assert flags  # well-formed pairs


def test_supernode_command_carries_the_site_in_its_node_config(tmp_path: Path) -> None:
    made = write_credentials(tmp_path / "c", nodes=["site-a"])
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "x", "label": "a"}\n')
    cmd = supernode_command(link="link:9092", ca=made.ca_cert, key=made.node_keys["site-a"], data=data,
                            state_dir=tmp_path / "st", dp_epsilon=4, codec="int8", port=9100, max_retries=2)
    assert cmd[0] == "flower-supernode" and "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == str(made.ca_cert)
    config = cmd[cmd.index("--node-config") + 1]
    parsed = tomllib.loads("\n".join(config.replace('" ', '"\n').replace(".0 ", ".0\n").split("\n")))
    assert parsed == {"data-path": str(data.resolve()), "site": "notes", "state-dir": str((tmp_path / "st").resolve()),
                      "dp-epsilon": 4.0, "codec": "int8"}
    assert cmd[-2:] == ["--max-retries", "2"] and "9100" in cmd
    assert "--isolation" not in cmd  # without a worker: Flower's own SuperExec, a process per message


def test_with_a_worker_the_supernode_starts_no_superexec_and_the_worker_takes_its_tasks(tmp_path: Path) -> None:
    from fedpeft.deploy.supervise import new_secret, worker_command

    made = write_credentials(tmp_path / "c", nodes=["site-a"])
    data = tmp_path / "notes.jsonl"
    data.write_text('{"text": "x", "label": "a"}\n')
    state = (tmp_path / "st").resolve()
    cmd = supernode_command(link="link:9092", ca=made.ca_cert, key=made.node_keys["site-a"], data=data,
                            state_dir=state, port=9100, worker=True)
    secret = state / "worker" / "superexec.secret"
    assert cmd[cmd.index("--isolation") + 1] == "process"
    assert cmd[cmd.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert 'worker=1' in cmd[cmd.index("--node-config") + 1]
    worker = worker_command(state, "127.0.0.1:9100")
    assert worker[worker.index("--runtime-api") + 1] == "127.0.0.1:9100"
    assert worker[worker.index("--secret-file") + 1] == str(secret)
    new_secret(secret)
    first = secret.read_bytes()
    assert len(first) == 64 and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    new_secret(secret)  # a new one for each life of the node
    assert secret.read_bytes() != first


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"link": "nohost"}, "--link must be HOST:PORT"),
    ({"data": "/no/such.jsonl"}, "site data file not found"),
    ({"ca": "/no/ca.crt"}, "CA certificate not found"),
    ({"dp_epsilon": 0.0}, "--dp-epsilon must be > 0"),
    ({"port": 70000}, "--port must be in 1..65535"),
])
def test_supernode_command_refuses_bad_input(tmp_path: Path, kwargs: dict, message: str) -> None:
    made = write_credentials(tmp_path / "c", nodes=["s"])
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    args = {"link": "h:1", "ca": made.ca_cert, "key": made.node_keys["s"], "data": data, **kwargs}
    with pytest.raises(FedPeftError, match=message):
        supernode_command(**args)


def test_node_config_string_refuses_quotes() -> None:
    assert node_config_string({"a": "x y", "b": 2, "c": 0.5}) == 'a="x y" b=2 c=0.5'
    with pytest.raises(FedPeftError, match="must not contain quotes"):
        node_config_string({"data-path": 'a"b'})


def test_connection_is_added_to_the_flwr_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "home"))
    made = write_credentials(tmp_path / "c")
    path = add_connection("hospitals", control="link:9093", ca=made.ca_cert, make_default=True)
    config = tomllib.loads(path.read_text())
    assert config["superlink"]["default"] == "hospitals"
    assert config["superlink"]["local"] == {"address": ":local:"}  # Flower's own default kept
    assert config["superlink"]["hospitals"] == {"address": "link:9093", "root-certificates": str(made.ca_cert)}
    before = path.read_text()
    with pytest.raises(FedPeftError, match="already has a connection named 'hospitals'"):
        add_connection("hospitals", control="other:1", ca=made.ca_cert)
    assert path.read_text() == before
    (tmp_path / "home" / "config.toml").write_text("[superlink\n")
    with pytest.raises(FedPeftError, match="is not valid TOML"):
        add_connection("x", control="a:1", ca=made.ca_cert)


# --- a site's own data -------------------------------------------------------------------------------

def test_node_identity_of_a_deployed_site_and_of_a_simulated_node() -> None:
    from fedpeft.site import node_identity

    pid, num, key = node_identity({"data-path": "/data/hospital-a.jsonl"}, 10)
    assert (num, key) == (0, "hospital-a") and 0 <= pid < 2**31
    assert node_identity({"data-path": "/data/x.jsonl", "site": "north"}, 10)[2] == "north"
    assert node_identity({"data-path": "/x.jsonl", "site": "north"}, 10)[0] == node_identity(
        {"data-path": "/y.csv", "site": "north"}, 3)[0]  # stable: the name decides
    assert node_identity({"partition-id": 3, "num-partitions": 7}, 10) == (3, 7, "partition-00003")
    with pytest.raises(FedPeftError, match="must be a plain name"):
        node_identity({"data-path": "/x.jsonl", "site": "../etc"}, 10)


def test_a_site_trains_on_its_whole_file_with_the_runs_label_numbers(tmp_path: Path) -> None:
    from fedpeft.config import FedPeftConfig
    from fedpeft.data.sources import local_table

    data = tmp_path / "site.csv"
    data.write_text("text,label\nfine,rotten\ngood,rotten\nok,rotten\n")  # one class only: fine for a site
    table = local_table(FedPeftConfig(), str(data), label_names=["fresh", "rotten"])
    assert table.texts == ["fine", "good", "ok"] and table.label_names == ("fresh", "rotten")
    np.testing.assert_array_equal(table.labels, [1, 1, 1])
    with pytest.raises(FedPeftError, match=r"has labels \['rotten'\] that the run does not know"):
        local_table(FedPeftConfig(), str(data), label_names=["negative", "positive"])
    with pytest.raises(FedPeftError, match="site data file not found"):
        local_table(FedPeftConfig(), str(tmp_path / "missing.csv"), label_names=["fresh", "rotten"])


def test_a_deployed_site_reads_its_file_not_a_partition(tmp_path: Path, tiny_model_dir: Path) -> None:
    from fedpeft.config import FedPeftConfig
    from fedpeft.site import Sites

    data = tmp_path / "site.jsonl"
    data.write_text('{"text": "a fine film", "label": "fresh"}\n{"text": "dull", "label": "rotten"}\n')
    cfg = FedPeftConfig(model=str(tiny_model_dir))
    sites = Sites()
    site = sites.site(cfg, {"data-path": str(data)}, label_names=["fresh", "rotten"])
    assert len(site.data) == 2 and site.data.labels.tolist() == [0, 1]
    assert sites.site(cfg, {"data-path": str(data)}, label_names=["fresh", "rotten"]) is site  # kept
    os.utime(data, ns=(1, 1))
    data.write_text('{"text": "dull", "label": "rotten"}\n')  # a changed file is read again
    again = sites.site(cfg, {"data-path": str(data)}, label_names=["fresh", "rotten"])
    assert len(again.data) == 1 and again.model is site.model  # the model stays loaded


def test_a_causal_lm_site_trains_on_its_own_conversations(tmp_path: Path, tiny_lm_dir: Path,
                                                          instruction_data: Path) -> None:
    from fedpeft.config import FedPeftConfig
    from fedpeft.site import Sites
    from fedpeft.training import IGNORE

    data = tmp_path / "ward-7.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "What colour is the sky?"}, '
                    '{"role": "assistant", "content": "The sky is blue."}]}\n')
    cfg = FedPeftConfig(task="causal-lm", model=str(tiny_lm_dir), data=str(instruction_data))
    sites = Sites()
    encoded = sites.site(cfg, {"data-path": str(data)}, label_names=[]).data
    assert len(encoded) == 1 and encoded.per_token
    assert IGNORE in encoded.labels[0] and any(label != IGNORE for label in encoded.labels[0])
    data.write_text('{"text": "dull", "label": "rotten"}\n')
    os.utime(data, ns=(2, 2))
    with pytest.raises(FedPeftError, match="needs a messages column, or prompt and response columns"):
        sites.site(cfg, {"data-path": str(data)}, label_names=[])


def test_object_pulls_retry_soon_and_still_get_an_object_that_arrives_late(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import types

    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError

    waits: list[float] = []

    class Clock:  # the pulls' wait between tries, recorded instead of slept
        def __init__(self) -> None:
            self.set_ = False

        def wait(self, seconds: float) -> bool:
            waits.append(seconds)
            return self.set_

        def set(self) -> None:
            self.set_ = True

        def is_set(self) -> bool:
            return self.set_

    clocked = types.ModuleType("threading")
    clocked.__dict__.update(vars(inflatable_utils.threading))
    clocked.Event = Clock
    monkeypatch.setattr(inflatable_utils, "threading", clocked)
    receivers = {name: importlib.import_module(name) for name in PULL_REBINDS}
    for name, module in receivers.items():  # restored after the test
        monkeypatch.setattr(module, PULL_REBINDS[name].name, getattr(module, PULL_REBINDS[name].name))
    loop = receivers["flwr.supernode.start_client_internal"]
    eager_object_pulls(loop.__name__)
    first = loop.pull_objects
    eager_object_pulls(loop.__name__)
    assert loop.pull_objects is first  # once; a second call changes nothing
    asked: list[str] = []

    def pull(object_id: str) -> bytes:  # the sender uploads "b" only after the receiver first asks for it
        asked.append(object_id)
        if object_id == "b" and asked.count("b") < 3:
            raise ObjectUnavailableError(object_id)
        return object_id.encode()

    assert loop.pull_objects(object_ids=["a", "b"], pull_object_fn=pull) == {"a": b"a", "b": b"b"}
    assert len(waits) == 2 and FIRST_RETRY * 0.8 <= waits[0] <= FIRST_RETRY * 1.2  # Flower's first wait: 1 s
    assert FIRST_RETRY * 1.6 <= waits[1] <= FIRST_RETRY * 2.4  # still doubling
    for name, module in receivers.items():  # the worker's task input and the ServerApp's grid too
        eager_object_pulls(name)
        assert getattr(module, PULL_REBINDS[name].name).keywords == {"initial_backoff": FIRST_RETRY}


def test_a_pull_that_is_not_flowers_is_refused_not_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another release (or another patch) changed the pull: one line naming it, never a silent no-op."""
    from flwr.supernode.runtime import run_clientapp

    monkeypatch.delattr(run_clientapp, "pull_and_inflate_object_from_tree")
    with pytest.raises(FedPeftError, match=r"^Flower \S+: flwr\.supernode\.runtime\.run_clientapp\."
                                           r"pull_and_inflate_object_from_tree is missing;"):
        eager_object_pulls(run_clientapp.__name__)
    monkeypatch.setattr(run_clientapp, "pull_and_inflate_object_from_tree", lambda *a, **k: None, raising=False)
    with pytest.raises(FedPeftError, match="is no longer flwr.supercore.inflatable.inflatable_utils"):
        eager_object_pulls(run_clientapp.__name__)


def test_the_supernode_entry_point_caps_the_loops_sleeps_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from flwr.supernode import start_client_internal as loop

    from fedpeft.deploy import supernode

    slept: list[float] = []
    pushed: list[tuple] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(loop, "time", time)  # restored after the test
    monkeypatch.setattr(loop, "_push_messages", lambda *a, **k: pushed.append(a))
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    pace = supernode.patch_supernode(0.5)
    assert loop.pull_objects.keywords == {"initial_backoff": FIRST_RETRY}  # objects not there yet: asked again soon
    loop.time.sleep(3)  # Flower's idle wait: a request to the SuperLink each time
    loop.time.sleep(0.5)  # Flower's wait for the ClientApp's reply: a look into its own memory
    loop.time.sleep(0.02)
    assert slept == [0.5, 0.05, 0.02]
    loop._push_messages("state", "store")  # a reply goes out: the next round's message is due soon
    assert pushed == [("state", "store")]
    loop.time.sleep(3)
    pace.pushed -= supernode.EAGER_SECONDS  # 3 s later the node is idle again
    loop.time.sleep(3)
    assert slept[3:] == [supernode.EAGER_POLL, 0.5]
    assert loop.time.monotonic is time.monotonic and time.sleep == slept.append  # the real module is untouched
    with pytest.raises(FedPeftError, match=r"start_client_internal\.time is not the time module \(patched already"):
        supernode.patch_supernode(0.5)


def test_a_supernode_loop_without_what_the_patch_needs_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from flwr.supernode import start_client_internal as loop

    from fedpeft.deploy import supernode

    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.delattr(loop, "_push_messages")
    with pytest.raises(FedPeftError, match=r"start_client_internal\._push_messages is missing"):
        supernode.patch_supernode(0.5)
    assert loop.time is time and not hasattr(loop.pull_objects, "keywords")  # checked first, so nothing changed


def test_the_supernode_entry_point_refuses_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from flwr.supernode import start_client_internal as loop

    from fedpeft.deploy import supernode

    monkeypatch.setattr(loop, "time", loop.time)
    monkeypatch.delattr(loop, "_push_messages")
    assert supernode.main(["--poll", "0.5", "--superlink", "x:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "_push_messages is missing" in err and "--poll 3" in err
