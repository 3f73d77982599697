"""Case "clock": the wall clock stepped a year back and two years forward under the running daemon.

The daemon runs under libfaketime (Debian's `faketime`), its offset read from a timestamp file on every
call (`FAKETIME_TIMESTAMP_FILE`, `FAKETIME_NO_CACHE=1`), so the case steps the clock by rewriting the file:
`-365d` then `+365d`. `FAKETIME_DONT_FAKE_MONOTONIC=1`: a real clock step (NTP at boot, a dead RTC, an
operator's `date -s`) never moves CLOCK_MONOTONIC. libfaketime 0.9.10 then fails every
`clock_nanosleep` with EINVAL, so `time.sleep` raises in the daemon: a `sitecustomize` on the daemon's
PYTHONPATH makes `time.sleep` wait on an event instead (a test-harness shim, not spoold's code).

Checked: (1) no mass expiry: items done before the step (`keep: {done: 7d}`) are all still there after the
clock jumped a year forward (spoold.daemon.retention caps an item's age by how long the daemon watched
it); (2) no stalled retry: a retry due 10 s after a failure runs about 10 s later although the
clock went a year back in between; (3) no negative or year-long durations: a 3 s step running across each
step records about 3 s, and no `duration_s` in any history is negative or over a minute; (4) the daemon
keeps working after the steps (more items done).
"""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path
from typing import Any

from torture.daemon import Daemon, poll, sidecars, states
from torture.tally import Counts, Row, tracebacks_in

SHIM = '''"""torture/clock.py: libfaketime with an unfaked monotonic clock breaks clock_nanosleep (EINVAL)."""
import threading
import time


def _sleep(seconds: float) -> None:
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    threading.Event().wait(seconds)


time.sleep = _sleep
'''
RETRY_DELAY = 10.0
SLOW = 3.0


def faketime_library() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1") + glob.glob("/usr/lib/faketime/libfaketime.so.1"))
    return found[0] if found else None


def _config(work: Path, spool: Path, flag: Path) -> Path:
    config = {
        "spool": str(spool),
        "rescan": "1s",
        "queues": {
            "keep": {"settle": "0s", "concurrency": 4, "keep": {"done": "7d", "failed": "7d"}, "chain": ["checksum"]},
            "retry": {"settle": "0s", "retry": {"attempts": 3, "delays": ["0s", f"{RETRY_DELAY:g}s"]},
                      "chain": [{"exec": {"argv": ["sh", "-c", f"test -e {flag} || exit 75"]}}]},
            "slow": {"settle": "0s", "concurrency": 2, "chain": [{"exec": {"argv": ["sleep", f"{SLOW:g}"]}}]},
        },
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps(config))
    return path


def _drop(inbox: Path, names: list[str]) -> None:
    for name in names:
        (inbox / name).write_bytes(name.encode())


def _done(spool: Path, queue: str, names: list[str]) -> bool:
    found = states(spool, queue)
    return all(found.get(n) == "done" for n in names)


def _durations(spool: Path, queue: str) -> list[tuple[str, float]]:
    out = []
    for doc in sidecars(spool, queue):
        for step in doc.get("steps", []) if isinstance(doc, dict) else []:
            for record in step.get("history", []) if isinstance(step, dict) else []:
                if isinstance(record, dict) and isinstance(record.get("duration_s"), (int, float)):
                    out.append((f"{doc.get('item')}/{step.get('name')}", float(record["duration_s"])))
    return out


def _present(spool: Path, names: list[str]) -> int:
    return sum(1 for n in names if (spool / "keep" / "status" / f"{n}.json").exists()
               and (spool / "keep" / "done" / n).exists())  # fmt: skip


def _step_the_clock(spool: Path, offset: Path, flag: Path, figure: dict[str, Any], problems: list[str]) -> None:
    """A year back while a retry waits and a step runs, then two years forward while another step runs."""
    # A retry due RETRY_DELAY s after its failure, and a step running, when the clock goes a year back.
    _drop(spool / "retry" / "inbox", ["r.bin"])
    poll(lambda: states(spool, "retry").get("r.bin") == "retrying", 30, "the first attempt to fail")
    failed_at = time.monotonic()
    flag.write_text("")
    _drop(spool / "slow" / "inbox", ["slow-back.bin"])
    poll(lambda: states(spool, "slow").get("slow-back.bin") == "running", 30, "the slow step to start")
    time.sleep(1.0)
    offset.write_text("-365d\n")
    poll(lambda: states(spool, "retry").get("r.bin") == "done", RETRY_DELAY + 30, "the retry after -1 year")
    waited = time.monotonic() - failed_at
    figure["retry"] = f"retry due in {RETRY_DELAY:g} s ran after {waited:.1f} s"
    if not RETRY_DELAY - 1.5 <= waited <= RETRY_DELAY + 5:
        problems.append(f"the retry due in {RETRY_DELAY:g} s ran after {waited:.1f} s (clock a year back)")
    poll(lambda: _done(spool, "slow", ["slow-back.bin"]), 30, "the slow step across -1 year")
    # Two years forward: the items done "a year ago" by the clock's new reading must stay (keep 7d).
    _drop(spool / "slow" / "inbox", ["slow-forward.bin"])
    poll(lambda: states(spool, "slow").get("slow-forward.bin") == "running", 30, "the second slow step")
    time.sleep(1.0)
    offset.write_text("+365d\n")
    poll(lambda: _done(spool, "slow", ["slow-forward.bin"]), 30, "the slow step across +2 years")


def run(work: Path, quick: bool) -> list[Row]:
    library = faketime_library()
    faults = "clock -1 year, then +1 year (libfaketime)"
    if library is None:
        return [Row("clock", faults, Counts(), figure="cannot run here: no libfaketime (apt-get install faketime)")]
    spool, offset, flag, shim = work / "spool", work / "faketime", work / "flag", work / "shim"
    offset.write_text("+0s\n")
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    env = {"LD_PRELOAD": library, "FAKETIME_TIMESTAMP_FILE": str(offset), "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": str(shim)}  # fmt: skip
    daemon = Daemon(_config(work, spool, flag), spool, work / "daemon.log", env=env)
    count = 20 if quick else 200
    kept = [f"kept-{i:04d}.bin" for i in range(count)]
    later = [f"later-{i:04d}.bin" for i in range(10)]
    problems: list[str] = []
    figure: dict[str, Any] = {}
    try:
        daemon.start()
        _drop(spool / "keep" / "inbox", kept)
        poll(lambda: _done(spool, "keep", kept), 120, f"{count} items done before the steps", interval=0.5)
        _step_the_clock(spool, offset, flag, figure, problems)
        time.sleep(5.0)  # five rescans, each one prunes
        present = _present(spool, kept)
        figure["kept"] = f"{present} of {count} done items kept after +1 year"
        _drop(spool / "keep" / "inbox", later)
        try:
            poll(lambda: _done(spool, "keep", later), 60, "items dropped after the steps")
        except TimeoutError as exc:
            problems.append(str(exc))
        later_done = sum(1 for n in later if states(spool, "keep").get(n) == "done")
        durations = [d for q in ("keep", "retry", "slow") for d in _durations(spool, q)]
        negative = [f"{n} {d:g}" for n, d in durations if d < 0]
        huge = [f"{n} {d:g}" for n, d in durations if d > 60]
        slow = {n: d for n, d in durations if n.startswith("slow-")}
        figure["slow"] = "slow steps " + ", ".join(f"{d:.1f} s" for d in slow.values())
        if negative or huge:
            problems.append(f"durations negative or over a minute: {', '.join([*negative, *huge][:5])}")
        if len(slow) != 2 or any(not SLOW - 0.5 <= d <= SLOW + 5 for d in slow.values()):
            problems.append(f"the {SLOW:g} s steps across the clock steps recorded {slow}")
        alive = daemon.is_alive
        daemon.stop()
        counts = Counts(items=count + len(later) + 3, lost=(count - present) + (len(later) - later_done))
        return [Row("clock", faults, counts, tracebacks=tracebacks_in(daemon.log_path), daemon_alive=alive,
                    figure="; ".join(figure.values()), problems=problems)]  # fmt: skip
    finally:
        daemon.kill()
