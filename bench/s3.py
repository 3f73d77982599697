"""spoold's s3:// multipart upload vs boto3's own `upload_file`, to a local moto S3 server.

    python -m bench.s3              # both cases below, then the resume figure
    SPOOLD_BENCH_CASES=small python -m bench.s3     # or `large`, or `small,large`

Cases (same file, same part size and concurrency, same server, same run):
- small: SPOOLD_BENCH_MB (default 256) MiB in SPOOLD_BENCH_PART_MB (default 16) MiB parts,
  SPOOLD_BENCH_CONCURRENCY (default 4) in flight;
- large: 1 GiB in 100 MiB parts, 10 in flight (issue #16, field note 003): the
  memory case, target peak RSS <= 80 MiB.
Each case runs boto3 `upload_file` (its default CRC32 per part), spoold, and
boto3 `upload_file` with `ChecksumAlgorithm: SHA256` (the per-part checksum
spoold sends, which the server must verify too) interleaved (A B C A B C ...,
SPOOLD_BENCH_RUNS=3),
each upload in its own child process so its wall time, CPU time (user + system,
from wait4) and peak RSS (the child's own VmHWM) are its own; printed are the
medians and the spoold/boto3 ratios of the medians (targets: CPU <= 1.1, wall
<= 1.05). spoold is given the file's sha256, as the `checksum` step before
`ship` gives it in field note 003's chain (without it, `put_file` hashes the
whole file first: one more SHA-256 pass, about 0.6 s of CPU per GiB here).
Then the resume figure: a spoold upload is killed (SIGKILL) at about 50 % and
resumed; printed is how many parts already on the server were sent again
(target: at most concurrency).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1 << 20
BUCKET = "spoold-bench"
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _settings(endpoint: str, env: Mapping[str, str] = os.environ) -> dict[str, Any]:
    part_mb = int(env.get("SPOOLD_BENCH_PART_MB", "16"))
    concurrency = int(env.get("SPOOLD_BENCH_CONCURRENCY", "4"))
    return {"endpoint_url": endpoint, "part_size": part_mb * MiB, "concurrency": concurrency}


def child(method: str, endpoint: str, source: str, checkpoint_file: str = "", sha256: str = "") -> None:
    """One upload in this process (run as `python -m bench.s3 --child ...`)."""
    settings = _settings(endpoint)
    if method in ("boto3", "boto3-sha256"):
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3", endpoint_url=endpoint)
        config = TransferConfig(multipart_threshold=settings["part_size"], multipart_chunksize=settings["part_size"],
                                max_concurrency=settings["concurrency"], use_threads=True)  # fmt: skip
        # boto3-sha256: the same per-part checksum as spoold's (the server verifies SHA-256, not CRC32, per part).
        extra = {"ChecksumAlgorithm": "SHA256"} if method == "boto3-sha256" else {}
        client.upload_file(source, BUCKET, f"{method}.bin", Config=config, ExtraArgs=extra)
        _report_peak_rss()
        return
    from spoold.transports.base import TransferContext, parse_url
    from spoold.transports.s3 import S3Transport

    checkpoint: dict[str, Any] = json.loads(Path(checkpoint_file).read_text()) if checkpoint_file else {}

    def save() -> None:
        if checkpoint_file:
            Path(checkpoint_file + ".tmp").write_text(json.dumps(checkpoint))
            os.replace(checkpoint_file + ".tmp", checkpoint_file)

    transport = S3Transport(parse_url(f"s3://{BUCKET}/"), settings)
    ctx = TransferContext(progress=lambda _d, _t: None, checkpoint=checkpoint, save_checkpoint=save,
                          check_stop=lambda: None)  # fmt: skip
    transport.put_file(Path(source), "/spoold.bin", {"sha256": sha256} if sha256 else {}, ctx)
    _report_peak_rss()


def _report_peak_rss() -> None:
    """This process's own peak RSS, for `run_child`: wait4's ru_maxrss of a child started by vfork (as
    subprocess does) starts from the parent's peak, so it would report the larger of the two."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            print(f"peak-rss-kib {line.split()[1]}", flush=True)


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system, from wait4) and peak RSS (bytes, VmHWM) of one child upload."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bench.s3", "--child", *args], cwd=REPO, env=env,
                               stdout=subprocess.PIPE)  # fmt: skip
    assert process.stdout is not None
    output = process.stdout.read().decode()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"child {args[0]} failed with {process.returncode}")
    peak = [int(line.split()[1]) * 1024 for line in output.splitlines() if line.startswith("peak-rss-kib ")]
    return time.perf_counter() - start, usage.ru_utime + usage.ru_stime, peak[-1] if peak else 0


def write_source(path: Path, size_mb: int) -> str:
    """`size_mb` MiB of random bytes at `path`; their hex sha256."""
    block = os.urandom(16 * MiB)
    digest = hashlib.sha256()
    with open(path, "wb") as stream:
        for offset in range(0, size_mb * MiB, len(block)):
            piece = block[: min(len(block), size_mb * MiB - offset)]
            digest.update(piece)
            stream.write(piece)
    return digest.hexdigest()


def compare(name: str, endpoint: str, source: Path, sha256: str, env: dict[str, str], client: Any) -> dict[str, float]:
    """boto3 vs spoold on `source`, interleaved; prints and returns the medians and ratios."""
    settings = _settings(endpoint, env)
    size_mb = source.stat().st_size / MiB
    runs = int(os.environ.get("SPOOLD_BENCH_RUNS", "3"))
    print(f"{name}: {size_mb:.0f} MiB, part_size {settings['part_size'] // MiB} MiB, concurrency "
          f"{settings['concurrency']}, {runs} interleaved runs, moto server at {endpoint}", flush=True)  # fmt: skip
    results: dict[str, list[tuple[float, float, int]]] = {"boto3": [], "spoold": [], "boto3-sha256": []}
    for _ in range(runs):
        for method, runs_of in results.items():
            runs_of.append(run_child([method, endpoint, str(source), "", sha256], env))
            client.delete_object(Bucket=BUCKET, Key=f"{method}.bin")
    medians: dict[str, float] = {}
    for method, runs_of in results.items():
        wall = statistics.median(r[0] for r in runs_of)
        cpu = statistics.median(r[1] for r in runs_of)
        rss = max(r[2] for r in runs_of)
        medians.update({f"{method}_wall": wall, f"{method}_cpu": cpu, f"{method}_rss": rss / MiB})
        each = ", ".join(f"{r[0]:.2f}/{r[1]:.2f}" for r in runs_of)
        print(f"  {method:12s} wall {wall:6.2f} s ({size_mb / wall:6.1f} MiB/s)  CPU {cpu:6.2f} s "
              f"({cpu / (size_mb / 1024):5.2f} s/GiB)  peak RSS {rss / MiB:6.1f} MiB   [wall/CPU: {each}]")  # fmt: skip
    for reference in ("boto3", "boto3-sha256"):
        medians[f"wall_ratio_{reference}"] = wall_ratio = medians["spoold_wall"] / medians[f"{reference}_wall"]
        medians[f"cpu_ratio_{reference}"] = cpu_ratio = medians["spoold_cpu"] / medians[f"{reference}_cpu"]
        print(f"  ratio spoold/{reference} (medians): wall {wall_ratio:.2f} (target <= 1.05), "
              f"CPU {cpu_ratio:.2f} (target <= 1.1)")  # fmt: skip
    print(f"  spoold peak RSS {medians['spoold_rss']:.0f} MiB (target <= 80 MiB; boto3 "
          f"{medians['boto3_rss']:.0f} MiB)", flush=True)  # fmt: skip
    return medians


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server as the tests run it (tests/moto_launcher.py: conditional PUTs atomic, as real S3's are)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log, "wb") as stream:
        process = subprocess.Popen([sys.executable, "-m", "tests.moto_launcher", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=stream, stderr=subprocess.STDOUT, cwd=REPO)  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    process.kill()
    raise RuntimeError("moto server did not start")


def resume_figure(endpoint: str, source: Path, folder: Path, env: dict[str, str]) -> tuple[int, int, int]:
    """Kill an upload at about 50 %, resume it; (parts in all, parts on the server at the kill, re-sent)."""
    import boto3

    from spoold.transports.base import TransferContext, parse_url
    from spoold.transports.s3 import S3Transport

    settings = _settings(endpoint)
    count = -(-source.stat().st_size // settings["part_size"])
    state = folder / "checkpoint.json"
    state.write_text("{}")
    process = subprocess.Popen([sys.executable, "-m", "bench.s3", "--child", "spoold", endpoint, str(source),
                                str(state)], cwd=REPO, env=env)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        with_parts = json.loads(state.read_text() or "{}").get("parts", {})
        if len(with_parts) >= count // 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = json.loads(state.read_text())
    client = boto3.client("s3", endpoint_url=endpoint)
    listed = client.list_parts(Bucket=BUCKET, Key="spoold.bin", UploadId=checkpoint["upload_id"]).get("Parts", [])
    on_server = {int(p["PartNumber"]) for p in listed}
    transport = S3Transport(parse_url(f"s3://{BUCKET}/"), settings)
    sent: list[int] = []
    transport.client.meta.events.register("provide-client-params.s3.UploadPart",
                                          lambda params, **_: sent.append(int(params["PartNumber"])))  # fmt: skip
    ctx = TransferContext(progress=lambda _d, _t: None, checkpoint=checkpoint, save_checkpoint=lambda: None,
                          check_stop=lambda: None)  # fmt: skip
    transport.put_file(source, "/spoold.bin", {}, ctx)
    transport.close()
    return count, len(on_server), len(on_server & set(sent))


def main() -> None:
    import boto3

    cases = os.environ.get("SPOOLD_BENCH_CASES", "small,large").split(",")
    size_mb = int(os.environ.get("SPOOLD_BENCH_MB", "256"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-s3-", dir="/tmp") as tmp:
        folder = Path(tmp)
        moto, endpoint = start_moto(folder / "moto.log")
        env = {**os.environ, **ENV}
        os.environ.update(ENV)
        try:
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            source = folder / "data.bin"
            if "small" in cases:
                sha256 = write_source(source, size_mb)
                compare("small", endpoint, source, sha256, env, client)
                count, on_server, resent = resume_figure(endpoint, source, folder, env)
                print(f"  resume after SIGKILL at ~50%: {on_server} of {count} parts were on the server, "
                      f"{resent} of them sent again (target <= concurrency = {_settings(endpoint)['concurrency']})",
                      flush=True)  # fmt: skip
                client.delete_object(Bucket=BUCKET, Key="spoold.bin")
            if "large" in cases:
                sha256 = write_source(source, 1024)
                compare("large", endpoint, source, sha256,
                        {**env, "SPOOLD_BENCH_PART_MB": "100", "SPOOLD_BENCH_CONCURRENCY": "10"}, client)  # fmt: skip
        finally:
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
