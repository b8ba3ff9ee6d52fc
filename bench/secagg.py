"""What secure aggregation costs a site and the coordinator, per round: bytes on the wire and CPU seconds, for
cohorts of 10, 50 and 100 sites and two adapter sizes; the mask generator's throughput; and, with
``--simulate``, the round time of the README's main job with and without it.

    python bench/secagg.py                      # protocol costs (a few minutes on 2 cores)
    python bench/secagg.py --simulate           # + fedpeft simulate --rounds 2 with and without (about 8 min)

The protocol runs in this process through the product's own stages (:mod:`client.secure` turns an update into
the masked sum's input; :mod:`privacy.secagg` does the rest), with one site measured in full: a site's work is
the same as any other's. Its bytes are the serialised size of the records it sends (Flower's
``RecordDict`` framing, :func:`fedpeft.wire.record_nbytes`), in the layout of :mod:`client.secure`.

Sizes: ``minilm`` is the default run's LoRA adapter (r 8 on query and value of all-MiniLM-L6-v2, and the head:
74,498 values); ``7b`` is LoRA r 16 on q, k, v and o of a 32-layer, 4096-wide model (16.8 M values), as
bench/aggregation.py. For ``7b`` with 50 and 100 sites a site's masking is timed over 10 of its n masks (each one
ChaCha20 stream and one addition of the vector's size) and scaled to n, and the coordinator's unmasking
is n self masks at the generator's measured rate; the rows say ``mask_scaled``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedpeft.wire import record_nbytes  # noqa: E402
from privacy.secagg import fixed_point  # noqa: E402
from privacy.secagg.masks import prg  # noqa: E402
from privacy.secagg.protocol import advertise, mask, receive_shares, reveal, share, unmask  # noqa: E402

SIZES = {"minilm": 74_498, "7b": 32 * 4 * 2 * 16 * 4096}
TAG = b"bench/round-1"


def one_round(n: int, size: int, *, measured_peers: int | None = None) -> dict[str, float]:
    """Site 1's bytes and seconds in a round of ``n`` sites, and the coordinator's unmasking seconds."""
    rng = np.random.default_rng(0)
    threshold = n // 2 + 1
    ring = fixed_point.ring_bits(20, 100 * n)  # as the coordinator sizes it: n sites of weight at most 100
    secrets, roster = {}, {}
    for u in range(1, n + 1):
        secrets[u], roster[u] = advertise(round_tag=TAG, me=u)
    t = {}
    start = time.process_time()
    update = rng.normal(0, 1e-3, size)
    vector = np.concatenate([fixed_point.encode(update, clip=1.0, bits=20, weight=100, ring=ring),
                             np.array([100], np.uint64)])
    t["encode"] = time.process_time() - start
    start = time.process_time()
    outs = {u: share(secrets[u], roster, threshold=threshold) for u in range(1, n + 1)}
    t["share"] = (time.process_time() - start) / n
    for v in range(1, n + 1):
        receive_shares(secrets[v], {u: out[0][v] for u, out in outs.items() if u != v})
    start = time.process_time()
    if measured_peers is None:
        masked_1 = mask(secrets[1], vector, ring=ring, shared_with=range(1, n + 1))
        t["mask"] = time.process_time() - start
    else:  # one self mask and n-1 pair masks, each a stream of ``size`` values and an addition: timed on a few
        acc = vector.copy()
        for _ in range(measured_peers):
            acc = fixed_point.add(acc, prg(bytes(32), size + 1, bits=ring), ring=ring)
        t["mask"] = (time.process_time() - start) * n / measured_peers
    survivors = set(range(1, n + 1))
    start = time.process_time()
    revealed_1 = reveal(secrets[1], survivors=survivors, dropped=())
    t["reveal"] = time.process_time() - start

    keys_up = record_nbytes(RecordDict({"secagg-keys": ConfigRecord({"c": "00" * 32, "s": "00" * 32})}))
    shares_up = record_nbytes(RecordDict({"secagg-stage": ConfigRecord({"json": json.dumps(
        {"shares": {str(v): b.hex() for v, b in outs[1][0].items()}, "commitment": outs[1][1].hex()})})}))
    masked_up = record_nbytes(RecordDict({"masked": ArrayRecord({"vector": Array(fixed_point.pack(vector, ring))})}))
    reveal_up = record_nbytes(RecordDict({"secagg-stage": ConfigRecord({"json": json.dumps(
        {"revealed": {str(v): [k, p.hex()] for v, (k, p) in revealed_1.items()}})})}))
    row = {"sites": n, "values": size, "ring_bits": ring, "bytes_keys": keys_up, "bytes_shares": shares_up,
           "bytes_masked": masked_up,
           "bytes_reveal": reveal_up, "bytes_fp32": size * 4,
           "secagg_bytes_per_site": keys_up + shares_up + masked_up + reveal_up,
           **{f"site_s_{k}": round(v, 4) for k, v in t.items()},
           "site_s": round(sum(t.values()), 3), "mask_scaled": measured_peers is not None}
    if measured_peers is None and size <= 1_000_000:  # the coordinator's unmasking, for real (all survive)
        masked = {1: masked_1}
        for u in range(2, n + 1):
            masked[u] = mask(secrets[u], vector, ring=ring, shared_with=range(1, n + 1))
        revealed = {u: reveal(secrets[u], survivors=survivors, dropped=()) for u in range(1, threshold + 1)}
        start = time.process_time()
        total = unmask(masked, revealed, roster=roster, commitments={u: o[1] for u, o in outs.items()},
                       threshold=threshold, round_tag=TAG, ring=ring)
        row["coordinator_s_unmask"] = round(time.process_time() - start, 3)
        expected = fixed_point.decode(total[:-1], clip=1.0, bits=20, ring=ring) / int(total[-1])
        row["max_error"] = float(np.abs(expected - update).max())
    else:  # n self masks of ``size`` values, from the generator's measured rate
        row["coordinator_s_unmask"] = round(n * size / generator_rate(), 3)
    return row


_RATE: list[float] = []


def generator_rate() -> float:
    """ChaCha20 mask values per CPU second (uint64 words, ring reduction included)."""
    if not _RATE:
        prg(bytes(32), 1000, bits=64)
        start = time.process_time()
        prg(bytes(32), 8_000_000, bits=64)
        _RATE.append(8_000_000 / (time.process_time() - start))
    return _RATE[0]


def simulate_pair(out: Path) -> list[dict[str, float]]:
    """``fedpeft simulate --rounds 2`` with and without ``--secure-aggregation`` (the same seed, ``fedit``, no
    drift correction in either): wall seconds of the whole command, accuracy after each round, bytes."""
    rows = []
    for name, flags in (("plain", ["--drift", "none"]), ("secure", ["--secure-aggregation"])):
        run = out / name
        cmd = [sys.executable, "-m", "fedpeft.cli.main", "simulate", "--rounds", "2", "--seed", "0", "--quiet",
               "--out", str(run), *flags]
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        seconds = time.perf_counter() - started
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rows.append({"run": name, "wall_seconds": round(seconds, 1),
                     "accuracy": [m["accuracy"] for m in metrics],
                     "bytes_up_per_client": metrics[-1]["bytes_up_per_client"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", default="10,50,100")
    parser.add_argument("--sizes", default="minilm,7b")
    parser.add_argument("--simulate", action="store_true", help="also time fedpeft simulate with and without")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-secagg"))
    args = parser.parse_args()
    print(json.dumps({"generator_values_per_cpu_second": round(generator_rate())}), flush=True)
    for size_name in args.sizes.split(","):
        for n in (int(x) for x in args.sites.split(",")):
            big = SIZES[size_name] > 1_000_000
            row = one_round(n, SIZES[size_name], measured_peers=min(n, 10) if big and n > 10 else None)
            print(json.dumps({"size": size_name, **row}), flush=True)
    if args.simulate:
        if args.out.exists():
            raise SystemExit(f"{args.out} exists; choose another --out")
        for row in simulate_pair(args.out):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
