"""Case "events": lost inotify events, files dropped while stopped, an inbox removed and recreated.

(a) A flood of small files (50,000; 5,000 quick) written into a staging folder, then renamed into the inbox
in a burst, chain checksum -> ship file:// with `concurrency: 4`: once with the kernel's inotify queue
lowered to 16 events (set only while
the daemon starts: the limit is taken at inotify_init, so it is restored as soon as the daemon is ready, and
in `finally`), once with the default. Events are an accelerator (SPEC 3): the scan after an overflow must
find the rest, and nothing may be processed twice. (b) The daemon stopped, 1,000 files dropped, started
again: the start-up scan finds them. (c) The inbox removed (`rm -rf`) and recreated by a producer while the
daemon runs, then files dropped: they must be processed once, and soon (the figure gives how long the last
one took). spoold makes missing queue folders (SPEC 2) and, on the inbox's IN_DELETE_SELF, makes it again
and watches it again at once; before that fix its watch was dead and files waited for the periodic rescan.

Counted at the end of each part: destination files against what was dropped (lost, corrupt, duplicated,
temp names), and sidecars: every item done, and no original name with two sidecars (processed twice).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from torture.daemon import Daemon, poll, sidecars
from torture.tally import Counts, Row, scan_folder, sha256_bytes, tally, tracebacks_in

QUEUE = "ev"
SYSCTL = Path("/proc/sys/fs/inotify/max_queued_events")
SMALL_QUEUE = 16
RESCAN = 30.0  # long enough that part (c) tells a re-watched inbox from one only the periodic rescan finds
LOST_EVENTS = "inotify events were lost"


def _config(work: Path, spool: Path, dest: Path) -> Path:
    config = {
        "spool": str(spool),
        "rescan": f"{RESCAN:g}s",
        "queues": {QUEUE: {"settle": "0.2s", "concurrency": 4,
                           "chain": [{"checksum": {"algorithms": ["sha256"]}}, {"ship": {"to": f"file://{dest}/"}}]}},
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps(config))
    return path


def _drop(inbox: Path, prefix: str, count: int, staging: Path | None = None) -> dict[str, str]:
    """`count` small files written into the inbox (close-after-write each), or written into `staging`
    first and then renamed in as fast as renames go (moved-in each); name -> sha256."""
    expected = {}
    for i in range(count):
        name = f"{prefix}-{i:06d}.txt"
        data = f"{prefix} {i} {'x' * (i % 97)}\n".encode()
        with open((staging or inbox) / name, "wb") as stream:
            stream.write(data)
        expected[name] = sha256_bytes(data)
    if staging is not None:
        for name in expected:
            os.rename(staging / name, inbox / name)
    return expected


def _delivered_count(dest: Path) -> int:
    try:
        return sum(1 for name in os.listdir(dest) if not name.startswith("."))
    except FileNotFoundError:
        return 0


def _settle(spool: Path, dest: Path, total: int, timeout: float) -> tuple[int, int]:
    """Wait until `total` files arrived and `total` sidecars say done; (done sidecars, processed twice)."""
    poll(lambda: _delivered_count(dest) >= total, timeout, f"{total} files at the destination", interval=0.5)

    def finished() -> tuple[int, int] | None:
        docs = [d for d in sidecars(spool, QUEUE) if isinstance(d, dict)]
        done = sum(1 for d in docs if d.get("state") == "done")
        if done < total or any(d.get("state") not in ("done", "failed") for d in docs):
            return None
        twice = sum(n - 1 for n in Counter(str(d.get("original_name", d.get("item"))) for d in docs).values() if n > 1)
        return done, twice

    time.sleep(1.0)  # a second copy of anything would be on its way by now
    result = poll(finished, 60.0, "every sidecar to say done", interval=0.5)
    assert result is not None
    return result


def _part(daemon: Daemon, dest: Path, expected: dict[str, str], total: int, timeout: float,
          case_faults: str, figure: str) -> Row:  # fmt: skip
    """Count one part: everything dropped so far (`expected`, `total` items) against what arrived."""
    problems: list[str] = []
    try:
        done, twice = _settle(daemon.spool, dest, total, timeout)
    except TimeoutError as exc:
        done, twice = -1, 0
        problems.append(str(exc))
    counts = tally(expected, scan_folder(dest))
    counts.duplicated = max(counts.duplicated, twice)
    extra = _delivered_count(dest) - total
    if extra > 0:
        problems.append(f"{extra} unexpected files at the destination")
    if done >= 0 and done != total:
        problems.append(f"{done} done sidecars for {total} items")
    return Row("events", case_faults, counts, daemon_alive=daemon.is_alive, figure=figure, problems=problems)


def _flood(work: Path, count: int, small_queue: bool) -> Row:
    label = f"small{SMALL_QUEUE}" if small_queue else "default"
    root = work / label
    spool, dest = root / "spool", root / "dest"
    dest.mkdir(parents=True)
    inbox = spool / QUEUE / "inbox"
    daemon = Daemon(_config(root, spool, dest), spool, root / "daemon.log")
    original = SYSCTL.read_text().strip() if SYSCTL.exists() else None
    faults = f"{count} files, inotify queue {SMALL_QUEUE if small_queue else original or '?'}"
    try:
        try:
            if small_queue:
                if original is None or not os.access(SYSCTL, os.W_OK):
                    return Row("events", faults, Counts(), figure="cannot lower max_queued_events here (not root?)")
                SYSCTL.write_text(f"{SMALL_QUEUE}\n")
            daemon.start()
        finally:
            if small_queue and original is not None:
                SYSCTL.write_text(f"{original}\n")  # the daemon's inotify instance keeps the small limit
        staging = root / "staging"
        staging.mkdir()
        started = time.monotonic()
        expected = _drop(inbox, label, count, staging)
        dropped = time.monotonic() - started
        row = _part(daemon, dest, expected, count, max(180.0, count / 20), faults, "")
        elapsed = time.monotonic() - started
        log = daemon.log_path.read_text(errors="replace") if daemon.log_path.exists() else ""
        rescans = log.count(LOST_EVENTS)
        row.figure = (f"staged and moved in at {count / max(dropped, 1e-6):,.0f} files/s, all done in {elapsed:.0f} s "
                      f"({count / elapsed:,.0f} items/s); {rescans} overflow rescans")  # fmt: skip
        if small_queue and rescans == 0:
            row.problems.append("no overflow seen (the case did not test what it meant to)")
        daemon.stop()
        row.tracebacks = tracebacks_in(daemon.log_path)
        return row
    finally:
        daemon.kill()


def _stopped_and_removed(work: Path, count: int) -> list[Row]:
    root = work / "restart"
    spool, dest = root / "spool", root / "dest"
    dest.mkdir(parents=True)
    inbox = spool / QUEUE / "inbox"
    daemon = Daemon(_config(root, spool, dest), spool, root / "daemon.log")
    rows = []
    try:
        daemon.start()
        expected = _drop(inbox, "before", 10)
        _settle(spool, dest, 10, 60.0)
        daemon.stop()
        expected.update(_drop(inbox, "stopped", count))
        started = time.monotonic()
        daemon.start()
        rescans_from = time.monotonic()  # the periodic rescans come every RESCAN s from about here
        row = _part(daemon, dest, expected, len(expected), 120.0, f"{count} files dropped while stopped", "")
        row.figure = f"all done {time.monotonic() - started:.1f} s after the start"
        rows.append(row)
        # (c) the producer removes the inbox and makes it again; the daemon keeps running.
        mode = inbox.stat().st_mode & 0o7777
        # Just after a periodic rescan, so a daemon that does not watch the new inbox waits most of a period.
        time.sleep((RESCAN - (time.monotonic() - rescans_from) % RESCAN + 2.0) % RESCAN)
        shutil.rmtree(inbox)
        time.sleep(0.5)
        inbox.mkdir(exist_ok=True)  # the daemon may have made it again already
        os.chmod(inbox, mode)
        time.sleep(0.5)
        removed_count = max(count // 5, 50)
        started = time.monotonic()
        recreated = _drop(inbox, "recreated", removed_count)
        row = _part(daemon, dest, recreated, len(expected) + removed_count, RESCAN + 30.0,
                    "inbox rm -rf + mkdir while running", "")  # fmt: skip
        took = time.monotonic() - started
        row.figure = f"{removed_count} files after the inbox came back, all done in {took:.1f} s"
        if took > RESCAN / 2:
            row.problems.append(f"the recreated inbox was not watched (found by the {RESCAN:g} s rescan only)")
        rows.append(row)
        daemon.stop()
        tracebacks = tracebacks_in(daemon.log_path)
        for row in rows:
            row.tracebacks = tracebacks
        return rows
    finally:
        daemon.kill()


def run(work: Path, quick: bool) -> list[Row]:
    count = 5_000 if quick else 50_000
    parts: list[tuple[str, Callable[[], list[Row]]]] = [
        (f"{count} files, small inotify queue", lambda: [_flood(work, count, small_queue=True)]),
        (f"{count} files, default inotify queue", lambda: [_flood(work, count, small_queue=False)]),
        ("stopped; inbox removed", lambda: _stopped_and_removed(work, 1_000)),
    ]
    rows: list[Row] = []
    for faults, part in parts:
        try:
            rows.extend(part())
        except Exception as exc:  # noqa: BLE001 - one part's failure keeps the other parts' rows
            traceback.print_exc()
            rows.append(Row("events", faults, Counts(), problems=[f"the part failed: {type(exc).__name__}: {exc}"]))
    return rows
