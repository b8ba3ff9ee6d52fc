"""The delta broadcast (``downlink_delta``): what the coordinator and a site share to send the global adapter
as its change since the previous broadcast.

A broadcast is the same for every site, so a site that holds the previous one needs only the change. The
coordinator keeps the last broadcast ``B`` (what such sites hold, bit for bit). Each round it encodes the
change ``G − B`` of the global adapter ``G`` with the downlink codec (any codec: sparsifiers too), and
``B ← B + decode(change)``, computed by :func:`apply_change` on both ends. What the codec did not send stays
in ``G − B`` and goes out in a later round: the error feedback sits at the coordinator, and it is the same
for every site. Sites train from ``B``; the coordinator adds ``G − B`` back to the round's aggregate, so no
part of the global adapter is lost to the codec.

Every broadcast is named by :func:`broadcast_digest` (names, shapes and float32 bytes). A request names the
base the change applies to and the digest of the result; a site applies the change only to the broadcast of
that digest and checks the result's. Before the first round every site holds the seeded initial adapter
(its digest is known to both ends), so round 1 is a change too.

A site that missed rounds (it was not sampled) holds an older broadcast. The coordinator keeps the last
rounds' changes as sent (:class:`Change`) and sends such a site every change since the broadcast it holds,
oldest first (:func:`chain_records`; the request's ``downlink-chain`` counts the earlier ones), as long as
they are smaller than the whole adapter. Applied in order they rebuild ``B`` exactly. A site whose
broadcast is older than that, or that holds none the coordinator knows of (its state directory was lost),
gets the whole adapter in fp32 instead, and holds ``B`` exactly from then on.

A site keeps the base and the newest broadcast (:func:`save_broadcasts`) in
``<state_dir>/<site>/broadcast-<run_id>.npz``: a round the coordinator sends again after a crash names the
same base, which the site still has.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedpeft.feedback_state import load_residual, save_residual
from fedpeft.protocol import ARRAYS, CODEC, PAYLOAD
from fedpeft.runlog import safe_name

Tensors = dict[str, np.ndarray]


def broadcast_digest(tensors: Mapping[str, np.ndarray]) -> str:
    """A digest of a broadcast: its tensor names, shapes and float32 bytes (32 hex digits)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name], dtype=np.float32)
        h.update(f"{name}\0{value.shape}\0".encode())
        h.update(value.tobytes())
    return h.hexdigest()[:32]


def apply_change(base: Mapping[str, np.ndarray], change: Mapping[str, np.ndarray]) -> Tensors:
    """``base + change`` in float32, tensor by tensor: the coordinator and every site compute it alike."""
    return {k: (np.asarray(base[k], np.float32) + np.asarray(change[k], np.float32)).astype(np.float32)
            for k in base}


def same_tensors(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Whether ``a`` and ``b`` hold the same tensor names at the same shapes (a change can go from one to
    the other)."""
    return set(a) == set(b) and all(np.shape(a[k]) == np.shape(b[k]) for k in a)


def broadcast_path(state_dir: str | Path, site: str, run_id: str) -> Path:
    """Where a site keeps the broadcasts a change may apply to."""
    return Path(state_dir) / safe_name(site) / f"broadcast-{safe_name(run_id)}.npz"


def load_broadcasts(path: str | Path) -> dict[str, Tensors]:
    """The broadcasts a site keeps, by digest (empty when it keeps none).

    Raises
    ------
    ValueError
        The file exists but cannot be read.
    """
    stored = load_residual(path) or {}
    out: dict[str, Tensors] = {}
    for key, value in stored.items():
        digest, _, name = key.partition("/")
        out.setdefault(digest, {})[name] = value
    return out


def save_broadcasts(path: str | Path, broadcasts: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """Keep ``broadcasts`` (digest → tensors) atomically, replacing what was kept."""
    save_residual(path, {f"{digest}/{name}": value for digest, tensors in broadcasts.items()
                         for name, value in tensors.items()})


@dataclass(frozen=True)
class Change:
    """One broadcast change as it was sent: from the broadcast ``base`` to the broadcast ``digest``, its
    payload bytes and codec header (:func:`fedpeft.wire.payload_records`)."""

    base: str
    digest: str
    payload: np.ndarray = field(repr=False)
    header: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, records: Mapping[str, Any], *, base: str, digest: str) -> Change:
        return cls(base=base, digest=digest, payload=np.asarray(records[ARRAYS][PAYLOAD].numpy(), np.uint8),
                   header=dict(records[CODEC]))

    def records(self, suffix: str = "") -> dict[str, Any]:
        return {ARRAYS + suffix: ArrayRecord({PAYLOAD: Array(self.payload)}), CODEC + suffix: ConfigRecord(self.header)}


def link_suffix(j: int) -> str:
    """The record-name suffix of the ``j``-th earlier change of a chain (the last change has none)."""
    return f".{j}"


def chain_records(chain: Sequence[Change]) -> dict[str, Any]:
    """A message's records for ``chain`` (oldest first): the earlier changes under suffixed names, the last
    under the payload's own names."""
    out: dict[str, Any] = {}
    for j, change in enumerate(chain[:-1]):
        out |= change.records(link_suffix(j))
    return out | chain[-1].records()


def chain_payloads(content: Any, links: int) -> list[RecordDict]:
    """The earlier changes' records of a message holding ``links`` of them, oldest first, taken out of
    ``content`` (a RecordDict), each under the payload's own names.

    Raises
    ------
    KeyError
        A change the request counts is missing.
    """
    out = []
    for j in range(links):
        suffix = link_suffix(j)
        out.append(RecordDict({ARRAYS: content[ARRAYS + suffix], CODEC: content[CODEC + suffix]}))
        del content[ARRAYS + suffix]
        del content[CODEC + suffix]
    return out
