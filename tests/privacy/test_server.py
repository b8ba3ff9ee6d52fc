"""The coordinator's privacy side: entries a site sends again are ledgered in order, and a resumed run
continues its accounting from the ledger (every entry counts, a torn last line is cut)."""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import RecordDict

from fedpeft.config import FedPeftConfig
from fedpeft.errors import FedPeftError
from fedpeft.wire import PRIVACY, TRAINED, privacy_record
from privacy.ledger import Ledger, load_or_create_key, public_key_b64, read_lines, sign_entry, verify_chain
from privacy.server import LEDGER_FILE, LedgerCheck, RunPrivacy
from server.checkpoint import Checkpoint


def entry(site: str, seq: int, rnd: int, *, run: str = "run1") -> dict:
    return {"site": site, "site_seq": seq, "round": rnd, "epsilon": 0.5 * seq, "delta": 1e-5,
            "status": TRAINED, "run_id": run, "mechanism": "dp-sgd"}


def reply(keys: Path, e: dict, backlog: list[dict] = ()) -> RecordDict:
    key = load_or_create_key(keys / e["site"])
    resent = [{"entry": b, "signature": sign_entry(key, b)} for b in backlog]
    return RecordDict({PRIVACY: privacy_record(status=TRAINED, entry=e, signature=sign_entry(key, e),
                                               public_key=public_key_b64(key), backlog=resent)})


def test_a_lost_entry_is_ledgered_before_the_next_one(tmp_path: Path) -> None:
    check = LedgerCheck(Ledger(tmp_path / LEDGER_FILE), run_id="run1")
    assert check("a", 1, reply(tmp_path, entry("a", 1, 1))) is None
    # round 2's reply never arrived; without its entry round 3's does not follow on
    assert "entry number 3, expected 2" in check("a", 3, reply(tmp_path, entry("a", 3, 3)))
    assert check("a", 4, reply(tmp_path, entry("a", 3, 4), backlog=[entry("a", 1, 1), entry("a", 2, 2)])) is None
    lines = read_lines(tmp_path / LEDGER_FILE)
    assert [(x["entry"]["site_seq"], x["entry"]["round"]) for x in lines] == [(1, 1), (2, 2), (3, 4)]
    assert verify_chain(lines) == [] and check.epsilon == {"a": 1.5}


@pytest.mark.parametrize(("resent", "reason"), [
    (entry("a", 2, 2, run="other"), "another run"),
    (entry("a", 2, 5), "later round"),
    ({**entry("b", 2, 2)}, "another run, site"),
])
def test_a_resent_entry_must_be_the_sites_own_and_earlier(tmp_path: Path, resent: dict, reason: str) -> None:
    check = LedgerCheck(Ledger(tmp_path / LEDGER_FILE), run_id="run1")
    check("a", 1, reply(tmp_path, entry("a", 1, 1)))
    assert reason in check("a", 3, reply(tmp_path, entry("a", 2, 3), backlog=[resent]))
    assert len(read_lines(tmp_path / LEDGER_FILE)) == 1


def test_a_forged_resent_entry_is_refused(tmp_path: Path) -> None:
    check = LedgerCheck(Ledger(tmp_path / LEDGER_FILE), run_id="run1")
    check("a", 1, reply(tmp_path, entry("a", 1, 1)))
    content = reply(tmp_path, entry("a", 3, 3), backlog=[entry("a", 2, 2)])
    record = content[PRIVACY]
    record["backlog"] = record["backlog"].replace('"epsilon": 1.0', '"epsilon": 0.1')  # under-claim round 2
    assert "signature does not verify" in check("a", 3, content)
    assert len(read_lines(tmp_path / LEDGER_FILE)) == 1


def ledgered_run(tmp_path: Path) -> tuple[FedPeftConfig, Checkpoint]:
    cfg = FedPeftConfig(dp="local", dp_epsilon=8.0, dp_delta=1e-5, run_id="run1", out=str(tmp_path))
    check = LedgerCheck(Ledger(tmp_path / LEDGER_FILE), run_id="run1")
    for rnd in (1, 2):
        for site in ("a", "b"):
            assert check(site, rnd, reply(tmp_path / "keys", entry(site, rnd, rnd))) is None
    at = Checkpoint(run_id="run1", round=2, seed=0, population=2, ledger_count=4, ledger_head=check.ledger.head)
    check("a", 3, reply(tmp_path / "keys", entry("a", 3, 3)))  # round 3 did not commit; its spend still counts
    return cfg, at


def test_a_resumed_run_counts_every_ledgered_entry(tmp_path: Path) -> None:
    cfg, at = ledgered_run(tmp_path)
    with open(tmp_path / LEDGER_FILE, "a") as fh:
        fh.write('{"seq": 6, "prev": "')  # the crash tore the last line
    privacy = RunPrivacy(cfg, tmp_path, num_sites=2, key_dir=tmp_path / "coord", resume=at)
    assert privacy.local.epsilon == {"a": 1.5, "b": 1.0} and privacy.ledger.count == 5
    assert (tmp_path / LEDGER_FILE).read_text().endswith("}\n")
    assert privacy.site_config("a") == {"ledger-seq": 3} and privacy.site_config("c") == {"ledger-seq": 0}


def test_a_ledger_that_lost_committed_lines_refuses_to_resume(tmp_path: Path) -> None:
    cfg, at = ledgered_run(tmp_path)
    path = tmp_path / LEDGER_FILE
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:3]))
    with pytest.raises(FedPeftError, match="does not contain the head"):
        RunPrivacy(cfg, tmp_path, num_sites=2, key_dir=tmp_path / "coord", resume=at)
    path.write_text(path.read_text().replace('"epsilon": 1.0', '"epsilon": 0.1', 1))
    with pytest.raises(FedPeftError, match="does not verify"):
        RunPrivacy(cfg, tmp_path, num_sites=2, key_dir=tmp_path / "coord", resume=at)


def test_central_releases_are_composed_again_on_resume(tmp_path: Path) -> None:
    cfg = FedPeftConfig(dp="central", dp_epsilon=0.0, dp_delta=1e-5, dp_noise_multiplier=1.0, run_id="run1",
                        clients=4, fraction=0.5, out=str(tmp_path))
    first = RunPrivacy(cfg, tmp_path, num_sites=4, key_dir=tmp_path / "coord")
    first.after_round(1, clients=2)
    first.after_round(2, clients=1)
    at = Checkpoint(run_id="run1", round=2, seed=7, population=4, ledger_count=2, ledger_head=first.ledger.head)
    again = RunPrivacy(cfg, tmp_path, num_sites=4, key_dir=tmp_path / "coord", resume=at)
    assert again.central.releases == first.central.releases
    assert again.central.epsilon() == pytest.approx(first.central.epsilon())


def test_every_central_release_is_accounted_alike_however_many_answered(tmp_path: Path) -> None:
    """The noise (σC on the sum) and the denominator m are fixed, so a round of 1 of 3 sampled sites costs
    what a round of all 3 does; the ledger names how many answered and the relation accounted."""
    import json

    cfg = FedPeftConfig(dp="central", dp_epsilon=0.0, dp_delta=1e-5, dp_noise_multiplier=2.0, run_id="run1",
                        clients=6, fraction=0.5, dp_max_grad_norm=0.5, out=str(tmp_path))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    some = RunPrivacy(cfg, tmp_path / "a", num_sites=6, key_dir=tmp_path / "coord")
    every = RunPrivacy(cfg, tmp_path / "b", num_sites=6, key_dir=tmp_path / "coord")
    for rnd, (answered, sampled) in enumerate([(1, 3), (2, 3), (3, 3)], start=1):
        some.after_round(rnd, clients=answered)
        every.after_round(rnd, clients=sampled)
    assert some.central.epsilon() == every.central.epsilon() > 0
    lines = [json.loads(x)["entry"] for x in (tmp_path / "a" / LEDGER_FILE).read_text().splitlines()]
    assert [e["replies"] for e in lines] == [1, 2, 3] and {e["sample_size"] for e in lines} == {3}
    assert {(e["noise_multiplier"], e["noise_std"], e["neighbours"]) for e in lines} == {(1.0, 1.0, "replace-one")}
