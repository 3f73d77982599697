"""Core benchmarks: checksum throughput, detection latency and idle cost of the daemon.

Environment (defaults in brackets):
  SPOOLD_BENCH_MB [2048]        size of the checksum test file
  SPOOLD_BENCH_FILES [1000]     files dropped for the latency test
  SPOOLD_BENCH_RATE [200]       files per second
  SPOOLD_BENCH_IDLE_S [60]      idle measurement window
  SPOOLD_BENCH_DIR [$TMPDIR]    where the test files go (pick a real disk, not tmpfs, to match a spool)
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from spoold.digest import hash_file


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>14}  {note}")


# ---- (1) checksum throughput -------------------------------------------------------------------------------------


def _make_file(path: Path, size_bytes: int) -> None:
    block = os.urandom(1 << 20)
    with open(path, "wb") as stream:
        for _ in range(size_bytes >> 20):
            stream.write(block)


def _timed(fn: Callable[[], object], runs: int = 2) -> float:
    """Best wall time of `runs` calls (the file is in the page cache after the first read)."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_checksum(workdir: Path) -> dict[str, float]:
    mb = int(_env("SPOOLD_BENCH_MB", 2048))
    path = workdir / "checksum.bin"
    _make_file(path, mb << 20)
    hash_file(path, ["sha256"])  # warm the page cache
    results = {
        "spoold sha256+xxh3_128": _timed(lambda: hash_file(path, ["sha256", "xxh3_128"])),
        "sha256sum": _timed(lambda: subprocess.run(["sha256sum", str(path)], check=True, capture_output=True)),
        "openssl dgst -sha256": _timed(
            lambda: subprocess.run(["openssl", "dgst", "-sha256", str(path)], check=True, capture_output=True)
        ),
    }
    path.unlink()
    rates = {name: mb / seconds for name, seconds in results.items()}
    faster = max(rates["sha256sum"], rates["openssl dgst -sha256"])
    print(f"checksum of a cached {mb} MiB file (best of 2)")
    for name, rate in rates.items():
        _row(name, f"{rate:,.0f} MiB/s")
    ratio = rates["spoold sha256+xxh3_128"] / faster
    _row("ratio vs the faster reference", f"{ratio:.2f}x", "(target >= 0.9x)")
    return {"checksum_ratio": ratio}


# ---- daemon helpers ----------------------------------------------------------------------------------------------


class Daemon:
    def __init__(self, workdir: Path, config_text: str) -> None:
        self.spool = workdir / "spool"
        self.config = workdir / "spoold.yaml"
        self.config.write_text(config_text.replace("{spool}", str(self.spool)))
        self.log = open(workdir / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "spoold", "run", "-c", str(self.config)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited: {(workdir / 'daemon.log').read_text()}")
            try:
                health = json.loads((self.spool / "health.json").read_text())
                if health.get("ready") and health.get("pid") == self.process.pid:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise RuntimeError("daemon did not become ready in 30 s")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def _parse_iso(text: str) -> float:
    from spoold.daemon.sidecar import parse_iso

    value = parse_iso(text)
    assert value is not None
    return value


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# ---- (2) detection latency ---------------------------------------------------------------------------------------


def bench_latency(workdir: Path) -> dict[str, float]:
    count = int(_env("SPOOLD_BENCH_FILES", 1000))
    rate = _env("SPOOLD_BENCH_RATE", 200)
    daemon = Daemon(workdir, "spool: {spool}\nqueues:\n  q:\n    settle: 0s\n    concurrency: 4\n"
                             "    keep: {done: delete}\n    chain: [checksum]\n")  # fmt: skip
    inbox = daemon.spool / "q" / "inbox"
    watcher = subprocess.Popen(["inotifywait", "-m", "-q", "-e", "close_write", "--format", "%f", str(inbox)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    seen: dict[str, float] = {}

    def read_events() -> None:
        assert watcher.stdout is not None
        for line in watcher.stdout:
            seen.setdefault(line.strip(), time.time())

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    time.sleep(0.5)  # inotifywait sets up its watch
    closed: dict[str, float] = {}
    try:
        start = time.monotonic()
        for i in range(count):
            name = f"f{i:05d}.bin"
            with open(inbox / name, "wb") as stream:
                stream.write(b"x" * 4096)
            closed[name] = time.time()
            pause = start + (i + 1) / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        deadline = time.monotonic() + 60
        started: dict[str, float] = {}
        while time.monotonic() < deadline and len(started) < count:
            for name in closed:
                if name in started:
                    continue
                try:
                    doc = json.loads((daemon.spool / "q" / "status" / f"{name}.json").read_text())
                except (OSError, ValueError):
                    continue
                if doc["steps"][0].get("started"):
                    started[name] = _parse_iso(doc["steps"][0]["started"])
            time.sleep(0.1)
    finally:
        watcher.terminate()
        watcher.wait()
        daemon.stop()
    spoold_ms = [(started[n] - closed[n]) * 1000 for n in started]
    inotify_ms = [(seen[n] - closed[n]) * 1000 for n in closed if n in seen]
    print(f"detection latency: file closed -> sidecar running, {count} files at {rate:g}/s, settle 0s")
    print(f"  {'':<44} {'p50':>8} {'p99':>8} {'max':>8}  seen")
    rows = (("spoold (close -> step started)", spoold_ms), ("inotifywait -m (close -> event)", inotify_ms))
    for label, values in rows:
        if values:
            print(f"  {label:<44} {statistics.median(values):7.1f}ms {_percentile(values, 99):7.1f}ms "
                  f"{max(values):7.1f}ms  {len(values)}/{count}")  # fmt: skip
    p99 = _percentile(spoold_ms, 99) if spoold_ms else float("nan")
    _row("spoold p99 (target < 50 ms above settle)", f"{p99:.1f} ms")
    return {"latency_p99_ms": p99}


# ---- (3) idle ----------------------------------------------------------------------------------------------------


def bench_idle(workdir: Path) -> dict[str, float]:
    seconds = _env("SPOOLD_BENCH_IDLE_S", 60)
    queues = "".join(f"  q{i}:\n    chain: [checksum, manifest]\n" for i in range(10))
    daemon = Daemon(workdir, "spool: {spool}\nqueues:\n" + queues)
    try:
        time.sleep(1.0)
        before = daemon.cpu_seconds()
        time.sleep(seconds)
        used = daemon.cpu_seconds() - before
        rss = daemon.rss_bytes()
    finally:
        daemon.stop()
    print(f"idle: 10 queues, no S3/SFTP queue, {seconds:g} s")
    _row("CPU seconds used", f"{used:.2f} s", "(target ~0)")
    _row("resident memory (VmRSS)", f"{rss / (1 << 20):.1f} MiB", "(target < 40 MiB)")
    return {"idle_cpu_s": used, "rss_mib": rss / (1 << 20)}


def main() -> None:
    base = Path(os.environ.get("SPOOLD_BENCH_DIR", tempfile.gettempdir()))
    workdir = Path(tempfile.mkdtemp(prefix="spoold-bench-", dir=base))
    try:
        for bench in (bench_checksum, bench_latency, bench_idle):
            sub = workdir / bench.__name__
            sub.mkdir()
            bench(sub)
            print(flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
