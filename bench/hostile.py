"""Claim rate next to hostile inbox entries: good items must flow at >= 0.8x their rate without them.

Each round starts a fresh daemon with a queue of good 1 KiB files (`checksum`) and a bundles queue that
receives hostile entries at the same moment: FIFOs, symlinks, FIFO ready markers, oversized markers,
bundles holding a symlink or nested too deep. Rounds alternate (clean, hostile, clean, hostile, ...).

Environment: SPOOLD_BENCH_ITEMS [1000] good items (and as many hostile ones), SPOOLD_BENCH_ROUNDS [2].
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.core import Daemon, _env, _row

CONFIG = """\
spool: {spool}
queues:
  good:
    settle: 0s
    concurrency: 4
    chain: [checksum]
  hostile:
    items: bundles
    settle: 0s
    limits: {marker_bytes: 64KiB, depth: 8}
    chain: [checksum]
"""


def _stage_good(folder: Path, count: int) -> list[Path]:
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"good{i:06d}.bin"
        path.write_bytes(os.urandom(1024))
        paths.append(path)
    return paths


def _stage_hostile(inbox: Path, count: int, canary: Path) -> None:
    """Made straight in the inbox: each kind is complete as soon as it exists."""
    for i in range(count):
        kind = i % 5
        name = inbox / f"evil{i:06d}"
        if kind == 0:
            os.mkfifo(name)
        elif kind == 1:
            os.symlink(canary, name)
        elif kind == 2:
            name.mkdir()
            os.mkfifo(inbox / f"evil{i:06d}.ready")
        elif kind == 3:
            name.mkdir()
            (name / "frame.png").write_bytes(b"x")
            (inbox / f"evil{i:06d}.ready").write_bytes(b" " * (128 * 1024))
        else:
            deep = name
            for _ in range(12):
                deep = deep / "d"
            deep.mkdir(parents=True)
            os.symlink(canary, name / "link")
            (inbox / f"evil{i:06d}.ready").write_text("{}")


def _round(workdir: Path, count: int, *, hostile: bool) -> float:
    """Good items per second from the moment they are moved in until the last is in done/."""
    daemon = Daemon(workdir, CONFIG)
    try:
        good = _stage_good(workdir / "staging", count)
        if hostile:
            canary = workdir / "canary"
            canary.write_text("secret")
            _stage_hostile(daemon.spool / "hostile" / "inbox", count, canary)
        inbox, done = daemon.spool / "good" / "inbox", daemon.spool / "good" / "done"
        start = time.monotonic()
        for path in good:
            os.rename(path, inbox / path.name)
        deadline = start + 300
        while len(os.listdir(done)) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(os.listdir(done))} of {count} good items done in 300 s")
            time.sleep(0.01)
        seconds = time.monotonic() - start
        if daemon.process.poll() is not None:
            raise RuntimeError("the daemon died")
        if hostile:
            failed = len(os.listdir(daemon.spool / "hostile" / "failed"))
            _row("  hostile entries rejected to failed/ by then", f"{failed} of {count}")
    finally:
        daemon.stop()
    return count / seconds


def main() -> None:
    count = int(_env("SPOOLD_BENCH_ITEMS", 1000))
    rounds = int(_env("SPOOLD_BENCH_ROUNDS", 2))
    base = Path(tempfile.mkdtemp(prefix="spoold-bench-hostile-"))
    clean: list[float] = []
    dirty: list[float] = []
    try:
        print(f"claim rate of {count} good 1 KiB items (checksum, concurrency 4), alone and beside {count} hostile")
        for n in range(rounds):
            for hostile, results in ((False, clean), (True, dirty)):
                workdir = base / f"round{n}-{'hostile' if hostile else 'clean'}"
                workdir.mkdir()
                results.append(_round(workdir, count, hostile=hostile))
                _row(f"round {n + 1}, {'with hostile entries' if hostile else 'good items only'}",
                     f"{results[-1]:,.0f} items/s")  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = statistics.median(dirty) / statistics.median(clean)
    _row("ratio, with hostile / without (medians)", f"{ratio:.2f}x", "(target >= 0.8x)")


if __name__ == "__main__":
    main()
