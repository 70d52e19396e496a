"""BENCHMARKS.md holds one section per benchmark between `<!-- NAME:begin -->` and
`<!-- NAME:end -->` markers; each script rewrites only its own block."""

from __future__ import annotations

from pathlib import Path

HEADER = ("# Benchmarks\n\nOne section per benchmark; each script rewrites only the block between "
          "its own markers.\n")


def replace_section(path: Path, name: str, title: str, body: str) -> None:
    """Put `## title` + `body` between NAME's markers (appended when the block is missing)."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n## {title}\n\n{body.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n{block}\n"
    path.write_text(text)
