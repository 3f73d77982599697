"""spoold's sftp:// upload (with far-side verification) vs OpenSSH `sftp -b` put, to a loopback sshd.

    python -m bench.sftp            # 256 MiB; SPOOLD_BENCH_MB=1024 for the 1 GiB figure

Both transfers send the same file to the same sshd in the same run; wall time,
MiB/s and client CPU seconds are printed, with spoold/sftp ratios and the
benchmark process's peak RSS.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.sshd import Sshd, missing_reason, start_sshd  # noqa: E402

from spoold.transports.base import TransferContext, parse_url  # noqa: E402
from spoold.transports.sftp import SftpTransport  # noqa: E402

MiB = 1 << 20


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


def run_openssh(server: Sshd, source: Path, target: Path) -> tuple[float, float]:
    batch = target.parent / "batch"
    batch.write_text(f"put {source} {target}\n")
    argv = [
        "sftp", "-q", "-b", str(batch), "-i", str(server.identity), "-P", str(server.port),
        "-o", f"UserKnownHostsFile={server.known_hosts}", "-o", "StrictHostKeyChecking=yes",
        "-o", "BatchMode=yes", f"{server.user}@127.0.0.1",
    ]  # fmt: skip
    cpu, start = cpu_children(), time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, cpu_children() - cpu


def run_spoold(server: Sshd, source: Path, target: Path) -> tuple[float, float]:
    settings = {"identity": str(server.identity), "known_hosts": str(server.known_hosts), "connect_timeout": 10}
    context = TransferContext(lambda _d, _t: None, {}, lambda: None, lambda: None)
    cpu, start = cpu_self(), time.perf_counter()
    transport = SftpTransport(parse_url(server.url(str(target))), settings)
    try:
        delivered = transport.put_file(source, str(target), None, context)
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
    size_mib = int(os.environ.get("SPOOLD_BENCH_MB", "256"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-") as tmp:
        root = Path(tmp)
        source = root / "payload.bin"
        make_file(source, size_mib * MiB)
        server = start_sshd(root / "sshd")
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        try:
            (root / "dest").mkdir()
            ssh_s, ssh_cpu = run_openssh(server, source, root / "dest" / "openssh.bin")
            (root / "dest" / "openssh.bin").unlink()
            ours_s, ours_cpu = run_spoold(server, source, root / "dest" / "spoold.bin")
        finally:
            server.stop()
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"file: {size_mib} MiB over loopback sshd")
    print(f"OpenSSH sftp put          : {ssh_s:6.2f} s  {size_mib / ssh_s:7.1f} MiB/s  client CPU {ssh_cpu:5.2f} s")
    print(f"spoold put_file + verify  : {ours_s:6.2f} s  {size_mib / ours_s:7.1f} MiB/s  client CPU {ours_cpu:5.2f} s")
    print(f"ratio spoold/sftp: time {ours_s / ssh_s:.2f}x (target <= 1.5x), CPU {ours_cpu / max(ssh_cpu, 1e-9):.2f}x")
    print(f"peak RSS of this process: {rss_peak:.0f} MiB (before the transfers: {rss_before:.0f} MiB)")


if __name__ == "__main__":
    main()
