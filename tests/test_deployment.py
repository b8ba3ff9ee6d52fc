"""A real deployment on 127.0.0.1: ``flower-superlink`` and two ``flower-supernode`` processes with TLS and
node authentication over the gRPC Fleet API, started by docs/deployment.md's own commands.

The commands come from the docs/deployment.md block marked ``<!-- deployment: ... -->``. What the test changes,
and nothing else: free ports in place of 9092 (Fleet), 9093 (Control) and the nodes' local API; the
sites' files (``ca.crt``, ``<site>.key``, ``/data/<site>.jsonl``) in place of the paths a site would
have; node flags that make a refused node give up; the ``--run-config`` (a tiny model, 2 rounds).
Every process started here runs in its own session and is killed at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- deployment: tests/test_deployment.py runs these commands -->"
SITES = ("hospital-a", "hospital-b")


def readme_commands() -> list[str]:
    """The deployment block's command lines, in order (comments and blank lines dropped)."""
    text = (ROOT / "docs" / "deployment.md").read_text()
    assert MARK in text, "docs/deployment.md's deployment block lost its marker"
    block = text.split(MARK, 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def command(prefix: str) -> list[str]:
    lines = [line for line in readme_commands() if line.startswith(prefix)]
    assert lines, f"no docs/deployment.md deployment command starts with {prefix!r}"
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, detail: Callable[[], str] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" + (f"\n{detail()}" if detail else ""))


class Federation:
    """The processes and paths of one test federation."""

    def __init__(self, root: Path, model: Path) -> None:
        self.root, self.model = root, model
        self.fleet, self.control = free_port(), free_port()
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "FEDPEFT_DIR": str(root / "fedpeft"), "LINK_HOST": "127.0.0.1",
                    "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.certs = root / "fedpeft" / "certs"
        self.node_pids: dict[str, int] = {}

    def ports(self, line: str) -> str:
        return line.replace(":9092", f":{self.fleet}").replace(":9093", f":{self.control}")

    def home(self, role: str) -> dict[str, str]:
        path = self.root / "homes" / role
        path.mkdir(parents=True, exist_ok=True)
        return {**self.env, "FLWR_HOME": str(path), "FEDPEFT_STATE_DIR": str(self.root / "state" / role)}

    def run(self, line: str, role: str, *, timeout: float = 120) -> subprocess.CompletedProcess:
        proc = subprocess.run(["bash", "-c", line], env=self.home(role), cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        return proc

    def start(self, line: str, role: str) -> subprocess.Popen:
        with open(self.root / f"{role}.log", "w") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(["bash", "-c", f"exec {line}"], env=self.home(role), cwd=self.root, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def log(self, role: str) -> str:
        path = self.root / f"{role}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def node_line(self, site: str, port: int) -> str:
        line = command("fedpeft node")[0]
        line = line.replace("hospital-a", site).replace("--ca ca.crt", f"--ca {self.certs / 'ca.crt'}")
        line = line.replace(f"--key {site}.key", f"--key {self.certs / 'nodes' / f'{site}.key'}")
        line = line.replace(f"/data/{site}.jsonl", str(self.root / f"{site}.jsonl"))
        return self.ports(line) + f" --port {port} --max-retries 3 --max-wait 30"

    def start_link(self, extra_sites: tuple[str, ...] = ()) -> None:
        """docs/deployment.md's coordinator steps: credentials (and an intruder's key), the SuperLink, the flwr CLI's
        connection, both sites registered (and ``extra_sites``, the same way)."""
        self.run(command("fedpeft certs")[0] + " --node intruder" + "".join(f" --node {s}" for s in extra_sites),
                 "coordinator")
        self.start(self.ports(command("fedpeft link")[0].rstrip("&").strip()), "link")
        wait_for(lambda: "Starting Fleet API (gRPC-rere)" in self.log("link") and "Uvicorn running" in self.log("link"),
                 60, "the SuperLink")
        self.run(self.ports(command("fedpeft connection")[0]), "cli")
        for line in command("flwr supernode register"):
            self.run(line, "cli")
        for site in extra_sites:
            self.run(command("flwr supernode register")[0].replace(SITES[0], site), "cli")

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:  # the session's stragglers (superexec, clientapp processes) too
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def make_files(root: Path) -> None:
    """The coordinator's evaluation file and one file per site (the model is conftest's tiny BERT)."""
    from fedpeft.data import DEFAULT_DATA

    with open(DEFAULT_DATA, encoding="utf-8") as fh:
        rows = [json.loads(next(fh)) for _ in range(300)]
    parts = (("eval", rows[:100]), (SITES[0], rows[100:200]), (SITES[1], rows[200:300]), ("intruder", rows[100:200]))
    for name, part in parts:
        (root / f"{name}.jsonl").write_text("".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n"
                                                     for r in part))


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("deploy"), tiny_model_dir)
    make_files(fed.root)
    try:
        fed.start_link()
        for site in SITES:
            fed.node_pids[site] = fed.start(fed.node_line(site, free_port()), site).pid
        yield fed
    finally:
        fed.close()


def online_nodes(fed: Federation) -> list[dict]:
    proc = fed.run(fed.ports("flwr supernode list hospitals --format json"), "cli")
    return [n for n in json.loads(proc.stdout)["nodes"] if n.get("status") == "online"]


def fleet_connections(fed: Federation, pid: int) -> list:
    import psutil

    node = psutil.Process(pid)  # `fedpeft node`: its SuperNode child holds the connection
    return [c for p in (node, *node.children(recursive=True)) for c in p.net_connections(kind="tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.raddr and c.raddr.port == fed.fleet]


def test_two_sites_complete_a_two_round_run_over_grpc_with_tls_and_auth(federation: Federation) -> None:
    fed = federation
    wait_for(lambda: len(online_nodes(fed)) == 2, 90, "both SuperNodes online")
    for site, pid in fed.node_pids.items():  # the Fleet traffic: each node holds a connection to the gRPC port
        assert fleet_connections(fed, pid), f"{site} has no connection to the Fleet port {fed.fleet}"
    assert f"Starting Fleet API (gRPC-rere) on 0.0.0.0:{fed.fleet}" in fed.log("link")

    out = fed.root / "run"
    line = command("flwr run")[0]
    overrides = (f'rounds=2 fraction=1.0 model="{fed.model}" data="{fed.root / "eval.jsonl"}" '
                 f'test-fraction=0.5 max-local-steps=2 batch-size=8 client-cpus=1 out="{out}" '
                 'dp="local" dp-epsilon=20.0 dp-delta=1e-5')  # each site's own --dp-epsilon 8 caps it
    line = re.sub(r"--run-config '[^']*'", f"--run-config {shlex.quote(overrides)}", line)
    fed.run(fed.ports(line), "cli", timeout=600)

    runs = json.loads(fed.run(fed.ports(command("flwr ls")[0]) + " --format json", "cli").stdout)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2] and all(r["clients"] == 2 for r in records[1:])
    traffic = [json.loads(x) for x in (out / "traffic.jsonl").read_text().splitlines()]
    assert sorted((t["round"], t["site"], t["status"]) for t in traffic) == [
        (rnd, site, "accepted") for rnd in (1, 2) for site in SITES]
    for row in traffic:  # where each site's time went; the worker holds the model, so round 2 loads nothing
        assert {"seconds_load", "seconds_train", "seconds_wait"} <= set(row), row
        assert row["seconds_train"] > 0 and row["seconds_wait"] >= 0, row
        if row["round"] == 2:
            assert row["seconds_load"] < 1.0, row
    assert json.loads((out / "config.json").read_text())["clients"] == 2
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    ledger = [json.loads(x) for x in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    assert sorted((e["entry"]["round"], e["entry"]["site"]) for e in ledger) == [
        (rnd, site) for rnd in (1, 2) for site in SITES]
    assert all(e["entry"]["budget"] == 8.0 for e in ledger)  # the site's own cap, not the run's 20
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out)], capture_output=True,
                           text=True, timeout=300, env=fed.env)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]
    for site, pid in fed.node_pids.items():
        assert fleet_connections(fed, pid), f"{site} lost its Fleet connection"
        log = fed.log(site)  # one site worker held the model for the whole run: started once, trained each round
        assert log.count("site worker started") == 1, log[-3000:]
        assert "train round 1:" in log and "train round 2:" in log, log[-3000:]


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def submit(fed: Federation, overrides: str) -> subprocess.Popen:
    """``flwr run`` of docs/deployment.md (streaming the run's log until it ends) with these run-config overrides."""
    line = re.sub(r"--run-config '[^']*'", f"--run-config {shlex.quote(overrides)}", command("flwr run")[0])
    with open(fed.root / "submit.log", "a") as log:
        return subprocess.Popen(["bash", "-c", fed.ports(line)], env=fed.home("cli"), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def running_runs(fed: Federation) -> list[int]:
    runs = json.loads(fed.run(fed.ports(command("flwr ls")[0]) + " --format json", "cli").stdout)["runs"]
    return [r["run-id"] for r in runs if r["status"].startswith("running")]


def logs(fed: Federation) -> str:
    """The ends of the submission's and the sites' logs, for a failure message."""
    return "\n".join(f"--- {role}.log ---\n{fed.log(role)[-2500:]}" for role in ("submit", "link", *SITES))


def end(fed: Federation, proc: subprocess.Popen) -> None:
    """A submission that did not end on its own: stop its run at the SuperLink (a run left going keeps the
    sites busy and fails the tests after this one), then the ``flwr run`` streaming it."""
    if proc.poll() is None:
        for run_id in running_runs(fed):
            fed.run(fed.ports(f"flwr stop {run_id} hospitals"), "cli")
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)


def test_a_frozen_site_and_a_stopped_run_resumed_by_run_config(federation: Federation) -> None:
    """hospital-b's SuperNode (and its ClientApp processes) is frozen with SIGSTOP after round 1: it never
    answers, and rounds go on without it after the round timeout. The run is then stopped with ``flwr stop``
    and continued with ``--run-config resume=RUN_DIR``: every round once, no spend missing from the ledger."""
    fed = federation
    wait_for(lambda: len(online_nodes(fed)) == 2, 90, "both SuperNodes online")
    out = fed.root / "resumed"
    proc = submit(fed, f'rounds=4 fraction=1.0 model="{fed.model}" data="{fed.root / "eval.jsonl"}" '
                       f'test-fraction=0.5 local-epochs=100 max-local-steps=200 batch-size=8 '
                       f'client-cpus=1 out="{out}" round-timeout=45.0 dp="local" dp-epsilon=20.0 dp-delta=1e-5')
    # 200 steps (seconds a round): once hospital-b is marked unavailable, rounds 3 and 4 are hospital-a's
    # alone; at 2 steps both ended within 2.6 s, before `flwr ls` and `flwr stop` had stopped the run
    frozen = fed.node_pids["hospital-b"]
    try:
        wait_for(lambda: len(metrics(out)) >= 2, 300, "round 1")
        os.killpg(frozen, signal.SIGSTOP)
        wait_for(lambda: len(metrics(out)) >= 3, 180, "round 2 without hospital-b")
        running = running_runs(fed)
        assert len(running) == 1, running
        fed.run(fed.ports(f"flwr stop {running[0]} hospitals"), "cli")
    finally:
        os.killpg(frozen, signal.SIGCONT)
    try:
        proc.wait(timeout=120)
    finally:
        end(fed, proc)
    stopped = [r["round"] for r in metrics(out)]
    assert stopped[:3] == [0, 1, 2] and len(stopped) < 5, stopped

    wait_for(lambda: len(online_nodes(fed)) == 2, 120, "hospital-b back online")
    resumed = submit(fed, f'resume="{out}"')
    try:
        resumed.wait(timeout=600)
    except subprocess.TimeoutExpired:
        pytest.fail("the resumed run did not end within 600 s\n" + logs(fed))
    finally:
        end(fed, resumed)
    records = metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3, 4], (fed.root / "submit.log").read_text()[-3000:]
    assert records[2]["clients"] == 1  # round 2: hospital-b frozen
    traffic = {(t["round"], t["site"]): t["status"] for t in
               (json.loads(x) for x in (out / "traffic.jsonl").read_text().splitlines())}
    assert traffic[(2, "hospital-b")] == "no reply" and traffic[(2, "hospital-a")] == "accepted"
    # the run was stopped during round 3, which a site may have trained already: it trains it again after the
    # resume, and that spend can leave too little budget for round 4 (its own --dp-epsilon 8 caps it)
    assert traffic[(4, "hospital-a")] in ("accepted", "refused")
    assert sorted(traffic) == sorted({(r, s) for r in (1, 2, 3, 4) for s in SITES})  # each round logged once
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    entries = [json.loads(x)["entry"] for x in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    for site in SITES:  # every entry the site signed is in the coordinator's ledger
        (account,) = (fed.root / "state").glob(f"{site}/**/privacy-{run_id}.json")
        signed = json.loads(account.read_text())["entries"]
        assert [e["site_seq"] for e in entries if e["site"] == site] == list(range(1, signed + 1))
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out)], capture_output=True,
                           text=True, timeout=300, env=fed.env)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


def test_a_worker_killed_mid_round_fails_that_round_and_the_next_trains(federation: Federation) -> None:
    """kill -9 hospital-a's site worker while it trains round 2: the round records the site as failed with the
    worker's reason, `fedpeft node` starts a new worker, round 3 trains, no privacy spend is lost or doubled."""
    fed = federation
    wait_for(lambda: len(online_nodes(fed)) == 2, 120, "both SuperNodes online")
    out = fed.root / "killed"
    seen = len(fed.log("hospital-a"))  # the site's log so far (earlier tests ran on this node)
    proc = submit(fed, f'rounds=3 fraction=1.0 model="{fed.model}" data="{fed.root / "eval.jsonl"}" '
                       f'test-fraction=0.5 local-epochs=3 max-local-steps=0 batch-size=8 client-cpus=1 out="{out}" '
                       'round-timeout=300.0 dp="local" dp-epsilon=20.0 dp-delta=1e-5')
    try:
        wait_for(lambda: "train round 2 received" in fed.log("hospital-a")[seen:], 400, "round 2 at hospital-a",
                 lambda: logs(fed))
        pid = int(re.findall(r"site worker started \(pid (\d+)\)", fed.log("hospital-a"))[-1])
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=900)
    finally:
        end(fed, proc)
    log = fed.log("hospital-a")[seen:]
    assert "train round 2:" not in log, log[-3000:]  # killed before it answered
    assert log.count("site worker started") == 1 and "train round 3:" in log, log[-3000:]  # the restart trained
    records = metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3], (fed.root / "submit.log").read_text()[-3000:]
    assert [r["clients"] for r in records[1:]] == [2, 1, 2]
    traffic = {(t["round"], t["site"]): t for t in
               (json.loads(x) for x in (out / "traffic.jsonl").read_text().splitlines())}
    assert traffic[(2, "hospital-a")]["status"] == "failed"
    assert "site worker" in traffic[(2, "hospital-a")]["reason"], traffic[(2, "hospital-a")]
    assert traffic[(3, "hospital-a")]["status"] == "accepted"
    run_id = json.loads((out / "config.json").read_text())["run_id"]
    entries = [json.loads(x)["entry"] for x in (out / "privacy_ledger.jsonl").read_text().splitlines()]
    for site in SITES:  # every entry the site signed reached the coordinator's ledger, in order, once
        (account,) = (fed.root / "state").glob(f"{site}/**/privacy-{run_id}.json")
        signed = json.loads(account.read_text())["entries"]
        assert [e["site_seq"] for e in entries if e["site"] == site] == list(range(1, signed + 1))
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out)], capture_output=True,
                           text=True, timeout=300, env=fed.env)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


def test_secure_aggregation_over_tls_survives_a_site_killed_mid_protocol(tmp_path_factory: pytest.TempPathFactory,
                                                                         tiny_model_dir: Path) -> None:
    """--secure-aggregation with local DP on a federation of its own, three sites over TLS: kill -9 hospital-a's
    site worker while it trains round 2 (stage 1 of 4). The other two are still the threshold (a majority of
    three): round 2 is their secure sum; round 3 sums all three again; every ledger entry arrives and
    `fedpeft audit` passes."""
    sites = (*SITES, "hospital-c")
    fed = Federation(tmp_path_factory.mktemp("secure"), tiny_model_dir)
    make_files(fed.root)
    shutil.copy(fed.root / f"{SITES[0]}.jsonl", fed.root / "hospital-c.jsonl")
    out, proc = fed.root / "secure", None
    try:
        fed.start_link(extra_sites=("hospital-c",))
        for site in sites:
            fed.start(fed.node_line(site, free_port()), site)
        wait_for(lambda: len(online_nodes(fed)) == 3, 180, "three SuperNodes online")
        proc = submit(fed, f'rounds=3 fraction=1.0 model="{fed.model}" data="{fed.root / "eval.jsonl"}" '
                           f'test-fraction=0.5 local-epochs=3 max-local-steps=0 batch-size=8 client-cpus=1 out="{out}" '
                           'round-timeout=300.0 dp="local" dp-epsilon=20.0 dp-delta=1e-5 secure-aggregation=true')
        wait_for(lambda: "train round 2 received" in fed.log("hospital-a"), 400, "round 2 at hospital-a",
                 lambda: logs(fed))
        pid = int(re.findall(r"site worker started \(pid (\d+)\)", fed.log("hospital-a"))[-1])
        os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=900)
    finally:
        if proc is not None:
            end(fed, proc)
        fed.close()
    records = metrics(out)
    assert [r["round"] for r in records] == [0, 1, 2, 3], (fed.root / "submit.log").read_text()[-3000:]
    assert [r["clients"] for r in records[1:]] == [3, 2, 3] and "skipped" not in records[2]
    assert records[2]["secagg_threshold"] == 2 and records[3]["num_examples"] == 0  # weights only in the sum
    traffic = {(t["round"], t["site"]): t for t in
               (json.loads(x) for x in (out / "traffic.jsonl").read_text().splitlines())}
    assert traffic[(2, "hospital-a")]["status"] == "failed"
    assert traffic[(2, "hospital-b")]["status"] == traffic[(2, "hospital-c")]["status"] == "accepted"
    assert all(traffic[(3, s)]["status"] == "accepted" for s in sites)
    audit = subprocess.run([sys.executable, "-m", "fedpeft.cli.main", "audit", str(out)], capture_output=True,
                           text=True, timeout=300, env=fed.env)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-2000:]


def test_an_unregistered_key_is_refused(federation: Federation) -> None:
    fed = federation
    line = fed.node_line("intruder", free_port())  # a key made by `fedpeft certs`, never registered
    proc = fed.start(line, "intruder")
    assert proc.wait(timeout=90) != 0
    assert "Exit Code: 305" in fed.log("intruder")
    assert "No SuperNode found with the given public key" in fed.log("link")
    assert len(online_nodes(fed)) == 2


def test_a_node_without_tls_is_refused(federation: Federation) -> None:
    fed = federation
    cmd = (f"flower-supernode --insecure --superlink 127.0.0.1:{fed.fleet} --port {free_port()} "
           f"--node-config 'data-path=\"{fed.root / 'hospital-a.jsonl'}\"' --max-retries 2 --max-wait-time 20")
    proc = fed.start(cmd, "plaintext")
    assert proc.wait(timeout=90) != 0
    assert "Exit Code: 305" in fed.log("plaintext")
    assert len(online_nodes(fed)) == 2


def test_readme_block_is_what_the_test_runs() -> None:
    """The block holds exactly the commands this test takes from it (so neither drifts alone)."""
    prefixes = ["fedpeft certs", "fedpeft link", "fedpeft connection", "flwr supernode register",
                "flwr supernode register", "fedpeft node", "flwr run", "flwr ls"]
    assert [next(p for p in prefixes if line.startswith(p)) for line in readme_commands()] == prefixes
    assert sys.executable  # the commands run with this interpreter's PATH entries
