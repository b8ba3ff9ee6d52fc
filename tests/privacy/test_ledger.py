"""The ledger: site keys, signatures, the coordinator's hash chain, and what verification catches."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from privacy.ledger import (
    GENESIS,
    Ledger,
    LedgerError,
    line_hash,
    load_or_create_key,
    public_key_b64,
    read_lines,
    sign_entry,
    verify_chain,
    verify_signature,
)


def entry(site: str, seq: int, rnd: int, eps: float = 1.0) -> dict:
    return {"site": site, "site_seq": seq, "round": rnd, "epsilon": eps, "status": "trained", "run_id": "r"}


def test_key_is_created_private_and_reused(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "site")
    path = tmp_path / "site" / "ledger_ed25519.pem"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    again = load_or_create_key(tmp_path / "site")
    assert public_key_b64(again) == public_key_b64(key)
    assert public_key_b64(load_or_create_key(tmp_path / "other")) != public_key_b64(key)


def test_a_file_that_is_not_an_ed25519_key_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ledger_ed25519.pem").write_bytes(pem)
    with pytest.raises(LedgerError):
        load_or_create_key(tmp_path)


def test_signature_covers_every_field(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path)
    e = entry("a", 1, 1, eps=2.5)
    sig, pub = sign_entry(key, e), public_key_b64(key)
    assert verify_signature(pub, e, sig)
    assert verify_signature(pub, dict(reversed(list(e.items()))), sig)  # key order does not matter
    for field, value in (("epsilon", 2.4), ("round", 2), ("site", "b")):
        assert not verify_signature(pub, {**e, field: value}, sig)
    assert not verify_signature(pub, e, "not base64!")
    assert not verify_signature(public_key_b64(load_or_create_key(tmp_path / "x")), e, sig)


def signed(tmp_path: Path, site: str, seq: int, rnd: int, eps: float = 1.0) -> tuple[dict, str, str]:
    key = load_or_create_key(tmp_path / "keys" / site)
    e = entry(site, seq, rnd, eps)
    return e, sign_entry(key, e), public_key_b64(key)


def test_ledger_chains_and_reopens(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    first = ledger.admit(*signed(tmp_path, "a", 1, 1))
    second = ledger.admit(*signed(tmp_path, "b", 1, 1))
    assert first["prev"] == GENESIS and second["prev"] == first["hash"] == line_hash(first)
    reopened = Ledger(path)  # a restarted coordinator continues the chain
    assert reopened.head == second["hash"] and reopened.count == 2
    third = reopened.admit(*signed(tmp_path, "a", 2, 2))
    assert third["seq"] == 3 and third["prev"] == second["hash"]
    assert verify_chain(read_lines(path)) == []


def test_ledger_refuses_bad_entries_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(path)
    ledger.admit(*signed(tmp_path, "a", 1, 1))
    e, sig, pub = signed(tmp_path, "a", 2, 2)
    with pytest.raises(LedgerError, match="signature"):
        ledger.admit({**e, "epsilon": 0.1}, sig, pub)
    with pytest.raises(LedgerError, match="different key"):
        other = load_or_create_key(tmp_path / "impostor")
        ledger.admit(e, sign_entry(other, e), public_key_b64(other))
    with pytest.raises(LedgerError, match="entry number"):
        ledger.admit(*signed(tmp_path, "a", 3, 3))
    with pytest.raises(LedgerError, match="no site"):
        ledger.admit(*signed(tmp_path, "", 1, 1))
    assert len(read_lines(path)) == 1


def ledger_lines(tmp_path: Path) -> list[dict]:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    for rnd in (1, 2, 3):
        for site in ("a", "b"):
            ledger.admit(*signed(tmp_path, site, rnd, rnd, eps=float(rnd)))
    return read_lines(tmp_path / "ledger.jsonl")


def test_verify_chain_catches_edits_deletions_reordering_and_forgery(tmp_path: Path) -> None:
    lines = ledger_lines(tmp_path)
    assert verify_chain(lines) == []

    edited = [dict(line) for line in lines]
    edited[2] = {**edited[2], "entry": {**edited[2]["entry"], "epsilon": 0.5}}
    assert any("edited" in what for _, what in verify_chain(edited))

    deleted = lines[:2] + lines[3:]
    problems = verify_chain(deleted)
    assert any("deleted" in what for _, what in problems) and any("missing" in what for _, what in problems)

    reordered = [lines[0], lines[2], lines[1], *lines[3:]]
    assert verify_chain(reordered)

    # a forger rewrites one entry, re-signs it with its own key and recomputes the hash
    forged = [dict(line) for line in lines]
    key = load_or_create_key(tmp_path / "forger")
    e = {**forged[4]["entry"], "epsilon": 0.01}
    forged[4] = {**forged[4], "entry": e, "signature": sign_entry(key, e), "public_key": public_key_b64(key)}
    forged[4]["hash"] = line_hash(forged[4])
    assert any("key other than" in what for _, what in verify_chain(forged))


def test_pinned_keys_catch_a_rewritten_ledger(tmp_path: Path) -> None:
    lines = ledger_lines(tmp_path)
    real = {line["entry"]["site"]: line["public_key"] for line in lines}
    assert verify_chain(lines, pinned_keys=real) == []
    impostor = public_key_b64(load_or_create_key(tmp_path / "impostor"))
    problems = verify_chain(lines, pinned_keys={**real, "a": impostor})
    assert problems and all("pinned" in what for _, what in problems)


def test_malformed_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    with pytest.raises(LedgerError, match="line 1"):
        read_lines(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(LedgerError, match="object"):
        read_lines(path)
    assert verify_chain([{"seq": 1}]) == [(1, "malformed line (missing prev, entry, signature, public_key, hash)")]
    assert json.loads(json.dumps(verify_chain([]))) == []
