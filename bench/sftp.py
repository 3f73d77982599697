"""spoold's sftp:// upload (with far-side verification) vs OpenSSH `sftp -b` put, to a loopback sshd.

    python -m bench.sftp            # 1 GiB, 3 rounds; SPOOLD_BENCH_MB=256 SPOOLD_BENCH_ROUNDS=5 to change

Every round sends the same file to the same sshd, interleaved in one process:
spoold `put_file` including the far side's digest (no checksum known, so
hashed while sending), spoold with the sha256 a checksum step would have
given, spoold with the sha256 and xxh3_128 of `checksum: {algorithms: [sha256,
xxh3_128]}` (with `xxh128sum` on the far host, which `make bench` installs,
nothing is hashed here), OpenSSH `sftp` with its default cipher, and `sftp -c
aes128-gcm@openssh.com`. Medians of wall time, MiB/s and client CPU seconds
are printed, with the spoold/sftp ratios of the medians and the benchmark
process's peak RSS.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.sshd import Sshd, missing_reason, start_sshd  # noqa: E402

from spoold.digest import hash_file  # noqa: E402
from spoold.transports.base import TransferContext, parse_url  # noqa: E402
from spoold.transports.sftp import SftpTransport  # noqa: E402

MiB = 1 << 20
GCM = "aes128-gcm@openssh.com"


def make_file(path: Path, size_bytes: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as stream:
        left = size_bytes
        while left:
            stream.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_openssh(server: Sshd, source: Path, target: Path, cipher: str | None = None) -> tuple[float, float]:
    batch = target.parent / "batch"
    batch.write_text(f"put {source} {target}\n")
    argv = [
        "sftp", "-q", "-b", str(batch), "-i", str(server.identity), "-P", str(server.port),
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", *(["-c", cipher] if cipher else []), f"{server.user}@127.0.0.1",
    ]  # fmt: skip
    cpu, start = cpu_children(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_children() - cpu


def run_spoold(server: Sshd, source: Path, target: Path, known: dict[str, str]) -> tuple[float, float]:
    settings = {"identity": str(server.identity), "known_hosts": str(server.known_hosts), "connect_timeout": 10}
    context = TransferContext(lambda _d, _t: None, {}, lambda: None, lambda: None)
    cpu, start = cpu_self(), time.perf_counter()
    transport = SftpTransport(parse_url(server.url(str(target))), settings)
    try:
        delivered = transport.put_file(source, str(target), known, context)
    finally:
        transport.close()
    elapsed = time.perf_counter() - start
    assert delivered.is_verified and target.stat().st_size == source.stat().st_size
    return elapsed, cpu_self() - cpu


def main() -> None:
    reason = missing_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    size_mib = int(os.environ.get("SPOOLD_BENCH_MB", "1024"))
    rounds = int(os.environ.get("SPOOLD_BENCH_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-", dir="/tmp") as tmp:
        root = Path(tmp)
        source = root / "payload.bin"
        make_file(source, size_mib * MiB)
        known = hash_file(source, ["sha256", "xxh3_128"])  # what `checksum: {algorithms: [sha256, xxh3_128]}` gives
        server = start_sshd(root / "sshd")
        dest = root / "dest"
        dest.mkdir()
        runs: dict[str, Callable[[Path], tuple[float, float]]] = {
            "spoold put_file + verify": lambda t: run_spoold(server, source, t, {}),
            "OpenSSH sftp put (default)": lambda t: run_openssh(server, source, t),
            "spoold, sha256 given": lambda t: run_spoold(server, source, t, {"sha256": known["sha256"]}),
            "spoold, sha256 + xxh3_128 given": lambda t: run_spoold(server, source, t, known),
            f"OpenSSH sftp -c {GCM}": lambda t: run_openssh(server, source, t, GCM),
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            for number in range(rounds):
                for name, run in runs.items():
                    target = dest / f"out{number}.bin"
                    results[name].append(run(target))
                    target.unlink()
                    print(f"round {number + 1} {name:32s} {results[name][-1][0]:6.2f} s", flush=True)
        finally:
            server.stop()
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    wall = {name: statistics.median(s for s, _ in samples) for name, samples in results.items()}
    cpu = {name: statistics.median(c for _, c in samples) for name, samples in results.items()}
    print(f"file: {size_mib} MiB over loopback sshd, median of {rounds} interleaved rounds")
    for name in runs:
        print(f"{name:32s}: {wall[name]:6.2f} s  {size_mib / wall[name]:7.1f} MiB/s  client CPU {cpu[name]:5.2f} s")
    for ours in ("spoold put_file + verify", "spoold, sha256 given", "spoold, sha256 + xxh3_128 given"):
        for ref in ("OpenSSH sftp put (default)", f"OpenSSH sftp -c {GCM}"):
            print(f"ratio {ours} / {ref}: time {wall[ours] / wall[ref]:.2f}x (target <= 1.0x), "
                  f"CPU {cpu[ours] / max(cpu[ref], 1e-9):.2f}x")  # fmt: skip
    print(f"peak RSS of this process: {rss_peak:.0f} MiB (before the transfers: {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
