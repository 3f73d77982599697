"""A burst of small items: items/s, the daemon's peak memory during it, and its memory once idle again.

    python -m bench.burst          # SPOOLD_BENCH_BURST_ITEMS (5000) files of 1 KiB, checksum -> ship file://

SPOOLD_BENCH_BURST_CONCURRENCY (4) sets the queue's `concurrency`, SPOOLD_BENCH_DIR the folder it all runs in (a
tmpfs there shows the daemon's own ceiling, with no disk cost).

The files are written first, then renamed into the inbox as fast as the producer can (`settle: 0s`).
Peak memory is the daemon's VmHWM; "idle" is its VmRSS 10 s after the last item, once it
has handed freed memory back (daemon/memory.py). The durable-write rates beside it are write, fsync, rename,
fsync of the folder of a 1 KiB file in the same folder, timed in the same run: to a new name, and over an
existing file (what a sidecar rewrite costs; it frees an inode, see `durable_replaces_per_second`).
fsyncs per item are the daemon's `os.fsync` calls (counted by a `sitecustomize` on its PYTHONPATH, a
bench-only shim) over the items; CPU per item is the daemon's user + system time over the burst, the figure
that a noisy disk moves least.
Targets (issue 16): >= 1,000 items/s; < 60 MiB during a burst of 100,000; < 35 MiB idle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import wait_for  # noqa: E402

COUNTING_SHIM = """import atexit, os
_calls = [0]
_real = os.fsync
def _counted(fd):
    _calls[0] += 1
    return _real(fd)
os.fsync = _counted
atexit.register(lambda: open(os.environ["SPOOLD_BENCH_FSYNC_COUNT"], "w").write(str(_calls[0])))
"""


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """The process's user and system CPU time so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def durable_writes_per_second(folder: Path, count: int = 500) -> float:
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(1024)
    started = time.perf_counter()
    fd_dir = os.open(folder, os.O_RDONLY)
    try:
        for n in range(count):
            tmp, final = folder / f".t{n}", folder / f"f{n}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, final)
            os.fsync(fd_dir)
    finally:
        os.close(fd_dir)
    return count / (time.perf_counter() - started)


def durable_replaces_per_second(folder: Path, count: int = 500, files: int = 100) -> float:
    """Write, fsync, rename over one of `files` existing files, fsync the folder: what a sidecar rewrite
    costs. Unlike a new name, each one frees the inode it replaces, and an ext4 without a journal (these
    machines') skips recently freed inodes at the next create, by a scan that grows with them."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(1024)
    for n in range(files):
        (folder / f"f{n}").write_bytes(data)
    started = time.perf_counter()
    fd_dir = os.open(folder, os.O_RDONLY)
    try:
        for n in range(count):
            tmp = folder / f".t{n}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.rename(tmp, folder / f"f{n % files}")
            os.fsync(fd_dir)
    finally:
        os.close(fd_dir)
    return count / (time.perf_counter() - started)


def main() -> None:
    items = int(os.environ.get("SPOOLD_BENCH_BURST_ITEMS", "5000"))
    concurrency = int(os.environ.get("SPOOLD_BENCH_BURST_CONCURRENCY", "4"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-burst-", dir=os.environ.get("SPOOLD_BENCH_DIR")) as tmp:
        root = Path(tmp)
        spool, out, source = root / "spool", root / "out", root / "source"
        config = root / "spoold.yaml"
        config.write_text(f"spool: {spool}\nqueues:\n  q:\n    concurrency: {concurrency}\n    settle: 0s\n    chain:\n"
                          f"      - checksum: {{algorithms: [sha256]}}\n      - ship: {{to: 'file://{out}/'}}\n")
        source.mkdir()
        for n in range(items):
            (source / f"f{n:06d}").write_bytes(os.urandom(1024))
        disk_rate = durable_writes_per_second(root / "durable")
        replace_rate = durable_replaces_per_second(root / "replaced")
        log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed below
        (root / "shim").mkdir()
        (root / "shim" / "sitecustomize.py").write_text(COUNTING_SHIM)
        counted = root / "fsyncs"
        # The daemon of this checkout, whatever the venv has installed.
        path = os.pathsep.join([str(root / "shim"), str(REPO / "src")])
        env = {**os.environ, "PYTHONPATH": path, "SPOOLD_BENCH_FSYNC_COUNT": str(counted)}
        daemon = subprocess.Popen([sys.executable, "-m", "spoold", "run", "-c", str(config)], stderr=log,
                                  stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        try:
            wait_for((spool / "health.json").exists, 30, "the daemon ready", interval=0.1)
            before = _status(daemon.pid, "VmRSS")
            started, cpu_before = time.perf_counter(), _cpu_seconds(daemon.pid)
            for n in range(items):
                os.rename(source / f"f{n:06d}", spool / "q" / "inbox" / f"f{n:06d}")
            drained: list[float] = []

            def shipped() -> bool:
                if not drained and not os.listdir(spool / "q" / "inbox"):
                    drained.append(time.perf_counter() - started)
                return out.is_dir() and len(os.listdir(out)) >= items

            wait_for(shipped, 60 + items / 10, f"{items} shipped", interval=0.05)
            elapsed = time.perf_counter() - started
            user, system = (after - before for after, before in zip(_cpu_seconds(daemon.pid), cpu_before, strict=True))
            peak = _status(daemon.pid, "VmHWM")
            time.sleep(10)  # the idle figure is what is left after this long without work
            idle = _status(daemon.pid, "VmRSS")
        finally:
            daemon.terminate()
            daemon.wait(timeout=30)
            log.close()
        fsyncs = int(counted.read_text()) if counted.exists() else None
    mib = 1 << 20
    print(f"{items} items of 1 KiB, checksum -> ship file://, concurrency {concurrency}")
    print(f"  items/s                  {items / elapsed:8.0f}   (durable writes/s on this disk: {disk_rate:.0f} new, "
          f"{replace_rate:.0f} over a file; target >= 1,000 items/s)")
    print(f"  inbox drained after      {drained[0] if drained else elapsed:8.1f} s of {elapsed:.1f} s   "
          "(every entry moved to work/; claims pause while a full queue waits for workers, so this follows them)")
    print(f"  daemon CPU per item      {(user + system) / items * 1000:8.2f} ms   (user {user / items * 1000:.2f} + "
          f"system {system / items * 1000:.2f})")
    if fsyncs is not None:
        print(f"  fsyncs per item          {fsyncs / items:8.1f}   (os.fsync calls of the daemon over the items)")
    print(f"  RSS before / peak / idle {before / mib:5.1f} / {peak / mib:5.1f} / {idle / mib:5.1f} MiB   "
          "(targets: < 60 MiB during the burst, < 35 MiB idle)")


if __name__ == "__main__":
    main()
