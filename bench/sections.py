"""BENCHMARKS.md is shared by the benchmark scripts: each one rewrites only its own section, between its markers."""

from __future__ import annotations

from pathlib import Path

TITLE = "# Benchmarks"


def markers(name: str) -> tuple[str, str]:
    """The comment lines that open and close the section called `name`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def write_section(path: Path, name: str, text: str) -> None:
    """Puts `text` (without markers) between the markers of section `name` in `path`, or appends it as a new
    section; everything else in the file stays as it is."""
    start, end = markers(name)
    block = f"{start}\n{text.strip()}\n{end}"
    old = path.read_text() if path.exists() else TITLE + "\n"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)
