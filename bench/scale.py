"""A spool with a million finished items: start-up, `spoold status`, retention and an inbox rescan.

    python -m bench.scale          # SPOOLD_BENCH_SIDECARS (1,000,000) sidecars in status/, 1% of them failed

The sidecars are generated (a done item's document as the daemon writes it, names `item-0000000`), with no
data left in done/ (as after `keep.done` pruned it). Measured:
- `spoold run` until health.json says ready, after a clean stop and again after a SIGKILL;
- `spoold status` (all queues) and `spoold status q --json` while the daemon runs;
- the daemon's CPU over a minute of idle rescans (`rescan: 1s`) once start-up is over;
- the CPU of one rescan of a queue whose inbox holds 100,000 entries already tracked and whose work/ holds
  100,000 claimed items (in this process, on the daemon's QueueBook).
Targets (issue 16): ready <= 5 s, status <= 1 s, retention not reading every sidecar per rescan, rescan <= 1 s CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import wait_for  # noqa: E402

DONE_TEMPLATE = {
    "schema": "spoold.status/1", "queue": "q", "item": "", "original_name": "", "kind": "file", "state": "done",
    "step": None, "fields": {},
    "steps": [{"name": "checksum", "state": "done", "attempt": 1, "started": "2026-11-01T10:00:00.000Z",
               "finished": "2026-11-01T10:00:00.010Z", "result": {"sha256": "ab" * 32, "bytes": 1024},
               "history": [{"attempt": 1, "state": "done", "started": "2026-11-01T10:00:00.000Z",
                            "finished": "2026-11-01T10:00:00.010Z", "duration_s": 0.01, "bytes": 1024}]}],
    "attempts": 1, "next_attempt_at": None, "error": None, "created": "2026-11-01T10:00:00.000Z",
    "updated": "2026-11-01T10:00:00.020Z", "host": "bench", "spoold_version": "0.1.0", "payload": [""],
    "extras": [], "digests": {},
}  # fmt: skip


def generate(spool: Path, count: int) -> None:
    status = spool / "q" / "status"
    status.mkdir(parents=True)
    for sub in ("inbox", "work", "done", "failed"):
        (spool / "q" / sub).mkdir()
    for n in range(count):
        name = f"item-{n:07d}"
        doc = dict(DONE_TEMPLATE, item=name, original_name=name, payload=[name])
        if n % 100 == 99:
            doc.update(state="failed", error={"step": "checksum", "type": "io", "message": "x", "retryable": False})
        with open(status / f"{name}.json", "w") as stream:
            json.dump(doc, stream, indent=2)


def health(spool: Path) -> dict[str, object]:
    try:
        return json.loads((spool / "health.json").read_text())
    except (OSError, ValueError):
        return {}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(config: Path, spool: Path, log: Path) -> tuple[subprocess.Popen[bytes], float]:
    started = time.perf_counter()
    daemon = subprocess.Popen([sys.executable, "-m", "spoold", "run", "-c", str(config)], stdin=subprocess.DEVNULL,
                              stderr=open(log, "ab"))  # noqa: SIM115 - the child holds it
    wait_for(lambda: health(spool).get("pid") == daemon.pid and health(spool).get("ready") is True, 300,
             "the daemon ready", interval=0.02)  # fmt: skip
    return daemon, time.perf_counter() - started


def counted(spool: Path, count: int, started: float) -> float:
    """Seconds from `started` until health.json counts every finished item (a sweep reads them all)."""
    def is_counted() -> bool:
        counts = health(spool).get("queues", {})
        return isinstance(counts, dict) and sum(counts.get("q", {}).values()) == count
    wait_for(is_counted, 900, "every finished item counted", interval=0.2)
    return time.perf_counter() - started


def timed(*argv: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "spoold", *argv], check=True, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


def rescan_cpu(root: Path, count: int = 100_000) -> float:
    """CPU seconds of one QueueBook.rescan with `count` tracked inbox entries and `count` claimed items."""
    from spoold.daemon.config import load_config
    from spoold.daemon.layout import SpoolLayout
    from spoold.daemon.queues import QueueBook

    spool = root / "rescan"
    config_path = root / "rescan.yaml"
    config_path.write_text(f"spool: {spool}\nqueues:\n  r:\n    settle: 1h\n    concurrency: 1\n"
                           "    chain:\n      - checksum: {}\n")  # fmt: skip
    config = load_config(config_path)
    layout = SpoolLayout(config.spool, config.queues, config.group)
    layout.ensure()
    folders = layout.queues["r"]
    for n in range(count):
        (folders.inbox / f"in-{n:06d}").write_bytes(b"x")
        item = f"w-{n:06d}"
        (folders.work / item).mkdir()
        doc = dict(DONE_TEMPLATE, queue="r", item=item, original_name=item, payload=[item], state="queued",
                   steps=[{"name": "checksum", "state": "pending"}])  # fmt: skip
        (folders.status / f"{item}.json").write_text(json.dumps(doc))
    book = QueueBook(config, config.queues["r"], folders)
    book.recover()
    now = time.monotonic()
    book.rescan(now)  # the first sight of the inbox: every entry becomes a candidate
    started = time.process_time()
    book.rescan(now + 1)
    return time.process_time() - started


def main() -> None:
    count = int(os.environ.get("SPOOLD_BENCH_SIDECARS", "1000000"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-scale-", dir=os.environ.get("SPOOLD_BENCH_DIR")) as tmp:
        root = Path(tmp)
        spool, log = root / "spool", root / "daemon.log"
        config = root / "spoold.yaml"
        config.write_text(f"spool: {spool}\nrescan: 1s\nqueues:\n  q:\n    keep: {{done: 30d, status: 3650d}}\n"
                          "    chain:\n      - checksum: {}\n")  # fmt: skip
        began = time.perf_counter()
        generate(spool, count)
        print(f"{count:,} sidecars generated in {time.perf_counter() - began:.0f} s")
        began = time.perf_counter()
        daemon, first = start(config, spool, log)
        first_count = counted(spool, count, began)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=120)
        began = time.perf_counter()
        daemon, clean = start(config, spool, log)
        clean_count = counted(spool, count, began)
        status_all = min(timed("status", "-c", str(config)) for _ in range(3))
        status_json = min(timed("status", "-c", str(config), "q", "--json") for _ in range(3))
        cpu_before = cpu_seconds(daemon.pid)
        time.sleep(30)  # idle: what rescans (every second) and retention cost with this many sidecars
        idle_cpu = cpu_seconds(daemon.pid) - cpu_before
        counts = health(spool).get("queues")
        daemon.kill()
        daemon.wait()
        began = time.perf_counter()
        daemon, killed = start(config, spool, log)
        killed_count = counted(spool, count, began)
        daemon.terminate()
        daemon.wait(timeout=120)
        rescan = rescan_cpu(root)
    print(f"{count:,} sidecars in status/ (1% failed)")
    print(f"  ready: first start {first:6.2f} s, after a clean stop {clean:6.2f} s, after SIGKILL {killed:6.2f} s"
          "   (target <= 5 s)")
    print(f"  every item counted:    {first_count:6.2f} s / {clean_count:6.2f} s / {killed_count:6.2f} s   (after a "
          "stop that was not clean, a sweep reads every sidecar once, after ready)")
    print(f"  spoold status          {status_all:6.2f} s; status q --json {status_json:6.2f} s   (target <= 1 s)")
    print(f"  idle daemon CPU        {idle_cpu / 30 * 100:6.1f} % of a core (rescan every 1 s); counts {counts}")
    print(f"  rescan, 100,000 tracked inbox entries + 100,000 claimed items: {rescan:.2f} s CPU   (target <= 1 s)")


if __name__ == "__main__":
    main()
