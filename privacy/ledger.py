"""The privacy ledger: signed per-site entries in a hash chain, and their verification.

Each site holds an Ed25519 key (created once, kept on the site's own disk, mode 0600). After every
round it takes part in, a site signs an *entry* — what it spent and how: run, site, round, its own
entry count, status, (σ, q, steps), δ, the ε spent so far and its budget, the accountant. The
coordinator verifies the signature and appends the entry to ``RUN_DIR/privacy_ledger.jsonl`` as one
*line*::

    {"seq": i, "prev": hash of line i-1, "entry": {...}, "signature": b64, "public_key": b64,
     "hash": sha256 of the canonical JSON of the other five fields}

so an edited line changes its hash (and breaks its signature), a deleted or reordered line breaks
the chain (``seq`` and ``prev``), and an entry re-signed by another key no longer matches the key the
site signed with before (or the key the auditor pinned). A site's entries also count up (``site_seq``)
with a cumulative ε, so a site's missing entry shows even where the chain was rebuilt. The
coordinator records the chain's head hash in ``metrics.jsonl`` after every round, which catches a
truncated tail.

Threat model, stated plainly: the chain and the per-site signatures make tampering with a ledger
*detectable*; they cannot stop a coordinator that controls every file from rewriting the whole
ledger with keys of its own. Pin the sites' public keys (``fedpeft audit --keys``), obtained from
the sites, to close that gap.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedpeft.runlog import append_jsonl

GENESIS = "0" * 64
ENTRY_VERSION = 1
KEY_FILE = "ledger_ed25519.pem"


class LedgerError(ValueError):
    """An entry or a ledger line that does not verify."""


def canonical(obj: Any) -> bytes:
    """The bytes that are hashed and signed: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


# --- site side: the key and the signature ----------------------------------------------------------
def load_or_create_key(directory: str | Path) -> Any:
    """The site's Ed25519 private key from ``directory/ledger_ed25519.pem``, created (0600) if absent."""
    path = Path(directory) / KEY_FILE
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise LedgerError(f"{path} does not hold an Ed25519 key")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            return load_or_create_key(directory)
    finally:
        tmp.unlink(missing_ok=True)
    return key


def public_key_b64(key: Any) -> str:
    """The raw 32-byte public key of a private key, base64."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b64(raw)


def sign_entry(key: Any, entry: Mapping[str, Any]) -> str:
    """The base64 Ed25519 signature of ``canonical(entry)``."""
    return b64(key.sign(canonical(dict(entry))))


def verify_signature(public_key: str, entry: Mapping[str, Any], signature: str) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of ``entry``."""
    try:
        Ed25519PublicKey.from_public_bytes(unb64(public_key)).verify(unb64(signature), canonical(dict(entry)))
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# --- coordinator side: the chain ---------------------------------------------------------------------
def line_hash(line: Mapping[str, Any]) -> str:
    """sha256 over a ledger line's fields other than ``hash``."""
    body = {k: line[k] for k in ("seq", "prev", "entry", "signature", "public_key")}
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass
class Ledger:
    """Appends verified entries to ``path``, continuing an existing chain.

    Parameters
    ----------
    path : Path
        ``RUN_DIR/privacy_ledger.jsonl``.
    """

    path: Path
    head: str = GENESIS
    count: int = 0
    keys: dict[str, str] = field(default_factory=dict)  # site → the public key it signs with
    site_seq: dict[str, int] = field(default_factory=dict)  # site → its last entry count

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.path.exists():
            for line in read_lines(self.path):
                self._advance(line)

    def _advance(self, line: Mapping[str, Any]) -> None:
        self.head, self.count = line["hash"], self.count + 1
        site = str(line["entry"].get("site"))
        self.keys.setdefault(site, line["public_key"])
        self.site_seq[site] = int(line["entry"].get("site_seq", 0))

    def admit(self, entry: Mapping[str, Any], signature: str, public_key: str) -> dict[str, Any]:
        """Verify a site's signed entry and append it; return the ledger line.

        Raises
        ------
        LedgerError
            A bad signature, a site signing with a different key than before, or an entry count
            that does not follow the site's previous one.
        """
        entry = dict(entry)
        site = str(entry.get("site", ""))
        if not site:
            raise LedgerError("ledger entry names no site")
        if not verify_signature(public_key, entry, signature):
            raise LedgerError(f"ledger entry of {site} round {entry.get('round')}: signature does not verify")
        known = self.keys.get(site)
        if known is not None and known != public_key:
            raise LedgerError(f"{site} signed with a different key than its earlier ledger entries")
        expected = self.site_seq.get(site, 0) + 1
        if int(entry.get("site_seq", -1)) != expected:
            raise LedgerError(f"{site} sent ledger entry number {entry.get('site_seq')}, expected {expected}")
        line: dict[str, Any] = {
            "seq": self.count + 1,
            "prev": self.head,
            "entry": entry,
            "signature": signature,
            "public_key": public_key,
        }
        line["hash"] = line_hash(line)
        append_jsonl(self.path, line)
        self._advance(line)
        return line


def cut_torn_tail(path: str | Path) -> int:
    """Remove a last line that a crash left half-written (no newline at the end); return the bytes cut.

    An entry on such a line was never committed; its site sends it again (see
    :class:`privacy.server.LedgerCheck`), so cutting it loses no spend.
    """
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1 if not data.endswith(b"\n") else len(data)
    if keep < len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return len(data) - keep


def read_lines(path: str | Path) -> list[dict[str, Any]]:
    """The ledger's lines as dicts; a line that is not a JSON object raises :class:`LedgerError`."""
    lines = []
    for number, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise LedgerError(f"line {number} is not JSON: {err.msg}") from None
        if not isinstance(obj, dict):
            raise LedgerError(f"line {number} is not a JSON object")
        lines.append(obj)
    return lines


def verify_chain(
    lines: list[Mapping[str, Any]], *, pinned_keys: Mapping[str, str] | None = None
) -> list[tuple[int, str]]:
    """Every problem with a ledger, as ``(line number, what)``; empty when it verifies.

    Checks, per line: the fields are there; ``seq`` counts up from 1; ``prev`` is the previous
    line's hash; ``hash`` matches the content; the signature verifies; the site signs with the same
    key throughout (and with its pinned key, if given); the site's own entry count goes up by one.
    """
    problems: list[tuple[int, str]] = []
    prev = GENESIS
    keys: dict[str, str] = dict(pinned_keys or {})
    site_seq: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        missing = [k for k in ("seq", "prev", "entry", "signature", "public_key", "hash") if k not in line]
        if missing or not isinstance(line.get("entry"), dict):
            problems.append((number, f"malformed line (missing {', '.join(missing) or 'entry object'})"))
            continue
        entry = line["entry"]
        site = str(entry.get("site"))
        if line["seq"] != number:
            problems.append((number, f"sequence number {line['seq']}, expected {number} (line deleted or moved)"))
        if line["prev"] != prev:
            problems.append((number, "does not chain to the previous line (line deleted, inserted or moved)"))
        try:
            recomputed = line_hash(line)
        except (TypeError, ValueError):
            recomputed = ""
        if recomputed != line["hash"]:
            problems.append((number, "content does not match its hash (line edited)"))
        if not verify_signature(str(line["public_key"]), entry, str(line["signature"])):
            problems.append((number, f"signature of {site} does not verify (entry edited or forged)"))
        key = keys.setdefault(site, str(line["public_key"]))
        if key != line["public_key"]:
            which = "pinned" if pinned_keys and site in pinned_keys else "first"
            problems.append((number, f"{site} signed with a key other than its {which} one"))
        expected = site_seq.get(site, 0) + 1
        if entry.get("site_seq") != expected:
            problems.append(
                (number, f"{site} entry number {entry.get('site_seq')}, expected {expected} (entry missing)")
            )
        site_seq[site] = int(entry.get("site_seq") or 0) if isinstance(entry.get("site_seq"), int) else expected
        prev = str(line["hash"])
    return problems
