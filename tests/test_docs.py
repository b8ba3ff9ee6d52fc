"""The documentation holds together: README.md and docs/*.md.

1. Every relative link resolves: the target file exists and a ``#anchor`` names a heading of the target page
   under GitHub's slug rules (lowercase, punctuation but ``-`` and ``_`` dropped, spaces to hyphens, ``-1``,
   ``-2`` … for repeated headings). External ``http(s)``/``mailto`` links are not followed.
2. Every command in a block marked runnable parses with the real ``fedpeft`` argument parser. A block is
   runnable when the line before its opening fence is ``<!-- runnable -->`` (or the deployment marker that
   ``tests/test_deployment.py`` runs). In it, each ``fedpeft …`` command (after joining ``\\`` continuations,
   dropping ``#`` comments and splitting at ``&&``, ``;``, ``|`` and ``&``) must be accepted by
   ``fedpeft.cli.main.build_parser``; nothing is run. Blocks with placeholders (``[--dp local …]``) stay
   unmarked.

Failures name ``file:line`` and say what is wrong; the counts are asserted so that the test cannot pass by
finding nothing.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from collections.abc import Iterator
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_MARKERS = ("<!-- runnable -->", "<!-- deployment: tests/test_deployment.py runs these commands -->")
SEPARATORS = {"&&", "||", "&", ";", "|"}
MIN_LINKS = 60  # relative links and anchors checked, over all pages
MIN_COMMANDS = 15  # fedpeft commands parsed, over all pages


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def where(path: Path, lineno: int) -> str:
    return f"{path.relative_to(ROOT)}:{lineno}"


def prose_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks (fence lines excluded)."""
    fence = ""
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.lstrip()
        if fence:
            if stripped.startswith(fence):
                fence = ""
            continue
        match = re.match(r"(`{3,}|~{3,})", stripped)
        if match:
            fence = match.group(1)
            continue
        yield lineno, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link in a heading: its text
    text = "".join(ch for ch in text.lower() if ch.isalnum() or ch in "-_ ")
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> frozenset[str]:
    """Every heading anchor of a Markdown page, repeated headings numbered as GitHub numbers them."""
    seen: dict[str, int] = {}
    found = set()
    for _, line in prose_lines(path):
        match = re.match(r" {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return frozenset(found)


def links(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, target) of every Markdown link or image outside code (fenced blocks, inline spans)."""
    for lineno, line in prose_lines(path):
        prose = re.sub(r"(`+).*?\1", "", line)
        for match in re.finditer(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            yield lineno, match.group(1)


def link_problem(path: Path, target: str) -> str | None:
    """Why a relative link does not resolve, or None when it does."""
    file_part, _, anchor = target.partition("#")
    dest = path if not file_part else (path.parent / file_part).resolve()
    if not dest.exists():
        return f"links to {target!r}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} not found"
    if anchor:
        if dest.suffix != ".md":
            return f"links to {target!r}: an anchor into a file that is not Markdown"
        if anchor not in anchors(dest):
            return f"links to {target!r}: no heading of {dest.relative_to(ROOT)} has the anchor #{anchor}"
    return None


def runnable_blocks(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number of the block's first line, its lines) for every fenced block right after a marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.strip() not in RUNNABLE_MARKERS:
            continue
        assert i + 1 < len(lines) and lines[i + 1].startswith("```"), (
            f"{where(path, i + 1)}: a runnable marker must sit on the line right before a ``` fence"
        )
        end = next((j for j in range(i + 2, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{where(path, i + 2)}: the runnable block is never closed"
        yield i + 3, lines[i + 2 : end]


def shell_commands(first: int, block: list[str]) -> Iterator[tuple[int, list[str]]]:
    """(line number, argv) of each simple command in a shell block: continuations joined, comments dropped."""
    start, pending = first, ""
    for lineno, line in enumerate(block, first):
        if not pending:
            start = lineno
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lexer = shlex.shlex(pending + line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        pending = ""
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                if argv:
                    yield start, argv
                argv = []
            else:
                argv.append(token)


def parse_error(argv: list[str]) -> str | None:
    """argparse's complaint about a ``fedpeft`` command line, or None when the real parser accepts it."""
    from fedpeft.cli.main import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(argv[1:])
    except SystemExit as exit_:
        return stderr.getvalue().strip().splitlines()[-1] if stderr.getvalue().strip() else f"exit {exit_.code}"
    return None


def test_slug_follows_github() -> None:
    assert slug("SSF: scale-and-shift features (`--peft ssf`)") == "ssf-scale-and-shift-features---peft-ssf"
    assert slug("`fedpeft audit RUN_DIR`") == "fedpeft-audit-run_dir"
    assert slug("Load the result with plain transformers + peft") == "load-the-result-with-plain-transformers--peft"
    assert slug("The default run's outputs") == "the-default-runs-outputs"


def test_repeated_headings_are_numbered(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Limits\n\n```bash\n# not a heading\n```\n\n## Limits\n\n### Limits\n")
    assert anchors(page) == {"limits", "limits-1", "limits-2"}


def test_links_and_anchors_resolve() -> None:
    problems, checked = [], 0
    for path in pages():
        for lineno, target in links(path):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: …: not followed
                continue
            checked += 1
            problem = link_problem(path, target)
            if problem:
                problems.append(f"{where(path, lineno)}: {problem}")
    assert not problems, "broken links:\n" + "\n".join(problems)
    assert checked >= MIN_LINKS, f"only {checked} relative links found in README.md and docs/ (expected >= {MIN_LINKS})"


def test_runnable_commands_parse() -> None:
    problems, parsed = [], 0
    for path in pages():
        for first, block in runnable_blocks(path):
            for lineno, argv in shell_commands(first, block):
                if argv[0] != "fedpeft":
                    continue
                parsed += 1
                error = parse_error(argv)
                if error:
                    problems.append(f"{where(path, lineno)}: {shlex.join(argv)}\n    {error}")
    assert not problems, "runnable commands the fedpeft parser refuses:\n" + "\n".join(problems)
    assert parsed >= MIN_COMMANDS, f"only {parsed} runnable fedpeft commands found (expected >= {MIN_COMMANDS})"
