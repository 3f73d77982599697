"""What every torture case counts: items lost, corrupt, duplicated and temp files published at a destination.

A case knows what it dropped (name -> sha256) and reads back what arrived at
the destination (name -> the sha256 of each copy found); `tally` compares the
two. A name is *duplicated* when it arrived more than once (a second copy under
a collision suffix counts too: `Delivered.add` takes the name as the case
found it, and the case maps suffixed names back with `base_name`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

# Names the daemon (or a transport) uses while a file is incomplete: they must never stay at a destination.
TEMP_PATTERNS = (re.compile(r"^\."), re.compile(r"\.(part|tmp|spoold-tmp)$"), re.compile(r"~$"))


def is_temp_name(name: str) -> bool:
    return any(p.search(name) for p in TEMP_PATTERNS)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


@dataclasses.dataclass
class Delivered:
    """What a destination holds: each final name with the digests of its copies, and the temp names seen."""

    copies: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    temps: list[str] = dataclasses.field(default_factory=list)

    def add(self, name: str, sha256: str) -> None:
        self.copies.setdefault(name, []).append(sha256)

    def merge(self, other: Delivered) -> None:
        for name, digests in other.copies.items():
            self.copies.setdefault(name, []).extend(digests)
        self.temps.extend(other.temps)


def scan_folder(folder: Path, *, recursive: bool = False, skip: Iterable[str] = ()) -> Delivered:
    """Every regular file below `folder` (names relative to it); temp names are counted, not hashed."""
    found = Delivered()
    skipped = set(skip)
    if not folder.exists():
        return found
    for root, dirs, files in os.walk(folder):
        if not recursive:
            dirs.clear()
        for name in files:
            relative = os.path.relpath(os.path.join(root, name), folder)
            if relative in skipped:
                continue
            if is_temp_name(name):
                found.temps.append(relative)
            else:
                found.add(relative, sha256_file(Path(root) / name))
    return found


@dataclasses.dataclass
class Counts:
    items: int = 0
    lost: int = 0
    corrupt: int = 0
    duplicated: int = 0
    temp_published: int = 0

    def __iadd__(self, other: Counts) -> Counts:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self

    @property
    def is_clean(self) -> bool:
        return self.lost == self.corrupt == self.duplicated == self.temp_published == 0


def tally(expected: Mapping[str, str], delivered: Delivered) -> Counts:
    """Compare what was dropped (name -> sha256) with what arrived."""
    counts = Counts(items=len(expected), temp_published=len(delivered.temps))
    for name, sha256 in expected.items():
        copies = delivered.copies.get(name, [])
        if not copies:
            counts.lost += 1
            continue
        if any(c != sha256 for c in copies):
            counts.corrupt += 1
        if len(copies) > 1:
            counts.duplicated += 1
    return counts


def tracebacks_in(log: Path) -> int:
    """How many Python tracebacks a daemon log holds (a bug the daemon did not turn into a clear error)."""
    if not log.exists():
        return 0
    return log.read_text(errors="replace").count("Traceback (most recent call last)")


@dataclasses.dataclass
class Row:
    """One line of the table `make torture` prints (and the README shows)."""

    case: str
    faults: str  # what was done to it, e.g. "500 SIGKILLs"
    counts: Counts
    tracebacks: int = 0
    daemon_alive: bool = True  # at the end, unless the case meant to kill it last
    figure: str = ""  # the case's own number, e.g. "0.8 MiB resent per kill"
    problems: list[str] = dataclasses.field(default_factory=list)  # anything else that must not happen

    @property
    def is_clean(self) -> bool:
        return self.counts.is_clean and self.tracebacks == 0 and self.daemon_alive and not self.problems


HEADER = ("case", "faults", "items", "lost", "corrupt", "dup", "temp", "tracebacks", "alive", "figure")


def table(rows: Iterable[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for row in rows:
        c = row.counts
        figure = "; ".join([row.figure, *row.problems]) if row.problems else row.figure
        cells = (row.case, row.faults, c.items, c.lost, c.corrupt, c.duplicated, c.temp_published, row.tracebacks,
                 "yes" if row.daemon_alive else "NO", figure)  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)
