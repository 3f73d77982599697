"""How well `rate:` holds a transfer to its cap: 1, 8 and 50 MiB/s over SFTP (loopback sshd) and S3 (moto).

    python -m bench.rate                          # 30 s per transfer, uploads and downloads
    SPOOLD_BENCH_RATE_SECONDS=5 python -m bench.rate
    python -m bench.rate 5 1,8                    # seconds per transfer, and the rates in MiB/s

Each transfer moves `rate x seconds` bytes under one `TokenBucket` at that rate.
Printed per transfer: the achieved rate over the transfer phase (first to last
byte, so the far side's verification is left out) as a ratio of the cap
(target: within 5 %), and the most bytes in any one second, as a multiple of
the cap (target: no second above 2x). For SFTP uploads the bytes are counted
where they land (the far side's partial file, polled every 20 ms); otherwise as
the transport reports them (S3 uploads: as the request bodies are sent). S3
downloads fetch a prefix of objects of at most 128 MiB, which moto can serve at
50 MiB/s (one 1.5 GiB object it serves at ~15 MiB/s even uncapped).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.sshd import missing_reason, start_sshd  # noqa: E402
from tests.transfer_samples import TransferSamples  # noqa: E402

from bench.s3 import BUCKET, ENV, start_moto  # noqa: E402
from spoold.ratelimit import Limiter, TokenBucket  # noqa: E402
from spoold.transports.base import TransferContext, Transport, parse_url  # noqa: E402

MiB = 1 << 20
RATES_MIB = (1, 8, 50)
PIECE_BYTES = 128 * MiB



def make_file(path: Path, size: int) -> None:
    block = os.urandom(16 * MiB)
    with open(path, "wb") as stream:
        left = size
        while left:
            stream.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def context(rate: int, progress: Callable[[int, int], None]) -> TransferContext:
    return TransferContext(progress=progress, checkpoint={}, save_checkpoint=lambda: None, check_stop=lambda: None,
                           limiter=Limiter([TokenBucket(rate)]))  # fmt: skip


def poll_size(path: Path, samples: TransferSamples, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        try:
            samples.add(path.stat().st_size)
        except FileNotFoundError:
            continue


def one(name: str, rate: int, action: Callable[[TransferContext, TransferSamples], None]) -> tuple[float, float]:
    samples = TransferSamples()
    started = time.monotonic()
    action(context(rate, samples.add), samples)
    elapsed = time.monotonic() - started
    ratio, burst = samples.achieved_bps() / rate, samples.max_second_bytes() / rate
    verdict = "ok" if abs(ratio - 1) <= 0.05 and burst <= 2 else "MISSED"
    print(f"{name:<14} cap {rate / MiB:5.0f} MiB/s  achieved/cap {ratio:6.3f}  max 1-s burst {burst:5.2f}x cap  "
          f"({elapsed:5.1f} s with verification)  {verdict}", flush=True)  # fmt: skip
    return ratio, burst


def run_sftp(root: Path, rates: list[int], seconds: float) -> list[tuple[float, float]]:
    from spoold.transports.sftp import SftpTransport

    reason = missing_reason()
    if reason:
        print(f"sftp skipped: {reason}")
        return []
    server = start_sshd(root / "sshd")
    settings = {"identity": str(server.identity), "known_hosts": str(server.known_hosts)}
    transport = SftpTransport(parse_url(server.url("/")), settings)
    results = []
    back = root / "back-sftp"
    back.mkdir()
    try:
        for rate in rates:
            source = root / f"sftp-{rate}.bin"
            make_file(source, int(rate * seconds))
            far = root / "far" / source.name

            def upload(ctx: TransferContext, samples: TransferSamples, source: Path = source, far: Path = far) -> None:
                ctx.progress = lambda _d, _t: None
                stop = threading.Event()
                poller = threading.Thread(target=poll_size, args=(far.with_name(f".{far.name}.spoold.part"),
                                                                  samples, stop))  # fmt: skip
                poller.start()
                try:
                    transport.put_file(source, str(far), {}, ctx)
                finally:
                    stop.set()
                    poller.join()

            results.append(one("sftp upload", rate, upload))
            results.append(one("sftp download", rate, lambda ctx, _s, far=far: _get(transport, far, back, ctx)))
            for path in (source, far, back / far.name):
                path.unlink()
    finally:
        transport.close()
        server.stop()
    return results


def _get(transport: Transport, remote: Path | str, back: Path, ctx: TransferContext) -> None:
    transport.get_tree(str(remote), back, ctx)


def run_s3(root: Path, rates: list[int], seconds: float) -> list[tuple[float, float]]:
    import boto3

    from spoold.transports.s3 import S3Transport

    moto, endpoint = start_moto(root / "moto.log")
    os.environ.update(ENV)
    results = []
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        settings: dict[str, Any] = {"endpoint_url": endpoint, "part_size": 16 * MiB, "concurrency": 4}
        transport = S3Transport(parse_url(f"s3://{BUCKET}/"), settings)
        back = root / "back-s3"
        back.mkdir()
        try:
            for rate in rates:
                source = root / f"s3-{rate}.bin"
                make_file(source, int(rate * seconds))
                key = source.name
                results.append(one("s3 upload", rate, lambda ctx, _s, s=source, k=key: _put(transport, s, k, ctx)))
                source.unlink()
                # moto reads a whole object for every ranged GET: past ~256 MiB it cannot serve 50 MiB/s at all
                # (15 MiB/s uncapped for 1.5 GiB), so the download is a prefix of objects of at most 128 MiB.
                prefix = _pieces(transport, root / f"s3-{rate}", int(rate * seconds))
                results.append(one("s3 download", rate, lambda ctx, _s, k=prefix: _get(transport, k, back, ctx)))
                shutil.rmtree(back / prefix.rstrip("/"))
        finally:
            transport.close()
    finally:
        moto.terminate()
        moto.wait(timeout=10)
    return results


def _pieces(transport: Transport, folder: Path, size: int) -> str:
    """`size` bytes as objects of at most `PIECE_BYTES` under a prefix named after `folder`, sent uncapped."""
    folder.mkdir()
    for index in range(-(-size // PIECE_BYTES)):
        make_file(folder / f"{index:04d}.bin", min(PIECE_BYTES, size - index * PIECE_BYTES))
    unlimited = TransferContext(progress=lambda _d, _t: None, checkpoint={}, save_checkpoint=lambda: None,
                                check_stop=lambda: None)  # fmt: skip
    transport.put_tree(folder, folder.name, {}, unlimited)
    shutil.rmtree(folder)
    return f"{folder.name}/"


def _put(transport: Transport, source: Path, target: str, ctx: TransferContext) -> None:
    transport.put_file(source, target, {}, ctx)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    seconds = float(args[0]) if args else float(os.environ.get("SPOOLD_BENCH_RATE_SECONDS", "30"))
    rates = [int(r) * MiB for r in args[1].split(",")] if len(args) > 1 else [r * MiB for r in RATES_MIB]
    print(f"{seconds:.0f} s per transfer; targets: achieved/cap within 5 %, no second above 2x the cap")
    with tempfile.TemporaryDirectory(prefix="spoold-bench-rate-") as tmp:
        root = Path(tmp)
        results = run_sftp(root, rates, seconds) + run_s3(root, rates, seconds)
    missed = [r for r in results if not (abs(r[0] - 1) <= 0.05 and r[1] <= 2)]
    print(f"{len(results) - len(missed)} of {len(results)} transfers within the targets")


if __name__ == "__main__":
    main()
