"""Rebuild ``bench/data/debian_packages.jsonl``: a 16-class, 20-site natural split for the heterogeneity
benchmark (``bench/heterogeneity.py``).

Source: the package index of Debian 12 "bookworm", component ``main`` (amd64), as
``apt-get update -o Acquire::Languages=en`` fetches it: ``Packages`` (sections, maintainers) and
``i18n/Translation-en`` (the long descriptions) of the 12.11 point release, 2025-07-11, plus
bookworm-updates and bookworm-security. Every package in ``main`` is free software under the Debian
Free Software Guidelines, and so is its description (part of the package's ``debian/control``).

Each example is one binary package: ``text`` its description (the synopsis line, then the long
description with paragraph marks removed), ``label`` its archive ``Section``, ``maintainer`` the name
in its ``Maintainer`` field (a team or a person: the site). Steps, all deterministic:

1. packages from ``pool/main``, one record per package name (the first ``apt-cache dumpavail`` lists),
   without the cross-compilers' per-architecture copies (names containing ``-cross``);
2. drop exact duplicate texts, keeping the alphabetically first package;
3. sites: the 20 maintainers with the most packages;
4. classes: the 16 most common sections among those sites' packages; other packages dropped;
5. sizes kept unequal but bounded: a site with n such packages keeps ``round(5 * sqrt(n))`` of them
   (``--scale``), drawn with ``numpy.random.default_rng(0)``: 117 to 313 examples a site.

The maintainers' specialisations make the split strongly label-skewed (the Perl group's packages are
almost all ``perl``; the Science team's spread over ``libs``, ``libdevel``, ``python``, ``doc`` …), as
natural splits by author are.

Usage (on a Debian 12 machine with ``main`` in its sources)::

    apt-get update -o Acquire::Languages=en && python scripts/make_debian_data.py
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "bench" / "data" / "debian_packages.jsonl"
LISTS = Path("/var/lib/apt/lists")


def stanzas(dump: str) -> list[dict[str, str]]:
    """Debian control stanzas → their fields (continuation lines joined with newlines)."""
    found = []
    for block in dump.split("\n\n"):
        fields: dict[str, str] = {}
        last = None
        for line in block.splitlines():
            if line.startswith(" ") and last:
                fields[last] += "\n" + line
            elif ":" in line:
                last, value = line.split(":", 1)
                fields[last] = value.strip()
        if fields:
            found.append(fields)
    return found


def packages(dump: str) -> dict[str, dict[str, str]]:
    """``apt-cache dumpavail`` output → package name → its fields, for packages of ``main``."""
    found: dict[str, dict[str, str]] = {}
    for fields in stanzas(dump):
        name = fields.get("Package", "")
        if name and "-cross" not in name and fields.get("Filename", "").startswith("pool/main/") \
                and name not in found:
            found[name] = fields
    return found


def long_descriptions() -> dict[str, str]:
    """Description-md5 → the English description (synopsis line, then the long text), from the
    ``Translation-en`` files ``apt-get update -o Acquire::Languages=en`` fetched."""
    found: dict[str, str] = {}
    for path in sorted(LISTS.glob("*_main_i18n_Translation-en*")):
        text = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", str(path)], capture_output=True, text=True,
                              check=True).stdout
        for fields in stanzas(text):
            if "Description-md5" in fields and "Description-en" in fields:
                found.setdefault(fields["Description-md5"], fields["Description-en"])
    if not found:
        raise SystemExit("no Translation-en files: run apt-get update -o Acquire::Languages=en first")
    return found


def description(fields: dict[str, str], english: dict[str, str]) -> str:
    """The synopsis and the long description as one line."""
    lines = english.get(fields.get("Description-md5", ""), fields.get("Description", "")).split("\n")
    body = [line.strip() for line in lines[1:] if line.strip() != "."]
    return re.sub(r"\s+", " ", f"{lines[0].strip()}. {' '.join(body)}").strip()


def build(dump: str, *, sites: int, classes: int, scale: float, seed: int) -> list[dict[str, str]]:
    rows, seen = [], set()
    english = long_descriptions()
    for _, fields in sorted(packages(dump).items()):
        text = description(fields, english)
        if text in seen or "Section" not in fields:
            continue
        seen.add(text)
        maintainer = fields.get("Maintainer", "").split("<")[0].strip().strip('"')
        rows.append({"text": text, "label": fields["Section"], "maintainer": maintainer})
    counts = collections.Counter(row["maintainer"] for row in rows)
    chosen = sorted(counts, key=lambda m: (-counts[m], m))[:sites]
    sections = collections.Counter(row["label"] for row in rows if row["maintainer"] in chosen)
    kept_classes = {s for s, _ in sorted(sections.items(), key=lambda kv: (-kv[1], kv[0]))[:classes]}
    rng = np.random.default_rng(seed)
    out = []
    for maintainer in chosen:
        mine = [row for row in rows if row["maintainer"] == maintainer and row["label"] in kept_classes]
        keep = min(len(mine), round(scale * len(mine) ** 0.5))
        mine = [mine[i] for i in sorted(rng.choice(len(mine), size=keep, replace=False))]
        out += mine
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=20)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--scale", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    dump = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True).stdout
    rows = build(dump, sites=args.sites, classes=args.classes, scale=args.scale, seed=args.seed)
    args.out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    labels = collections.Counter(row["label"] for row in rows)
    print(f"wrote {len(rows)} examples, {len(labels)} classes, "
          f"{len({row['maintainer'] for row in rows})} sites to {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
