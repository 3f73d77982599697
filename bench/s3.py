"""spoold's s3:// multipart upload vs boto3's own `upload_file`, to a local moto S3 server.

    python -m bench.s3              # 256 MiB; SPOOLD_BENCH_MB=1024 for the 1 GiB figure

Same file, same part size (SPOOLD_BENCH_PART_MB, default 16) and concurrency
(SPOOLD_BENCH_CONCURRENCY, default 4), same server, same run. Each upload runs
in its own child process so its peak RSS is its own. Then the resume figure:
a spoold upload is killed (SIGKILL) at about 50 % and resumed; printed is how
many parts already on the server were sent again (target: at most concurrency).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MiB = 1 << 20
BUCKET = "spoold-bench"
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _settings(endpoint: str) -> dict[str, Any]:
    part_mb = int(os.environ.get("SPOOLD_BENCH_PART_MB", "16"))
    concurrency = int(os.environ.get("SPOOLD_BENCH_CONCURRENCY", "4"))
    return {"endpoint_url": endpoint, "part_size": part_mb * MiB, "concurrency": concurrency}


def child(method: str, endpoint: str, source: str, checkpoint_file: str = "") -> None:
    """One upload in this process (run as `python -m bench.s3 --child ...`)."""
    settings = _settings(endpoint)
    if method == "boto3":
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3", endpoint_url=endpoint)
        config = TransferConfig(multipart_threshold=settings["part_size"], multipart_chunksize=settings["part_size"],
                                max_concurrency=settings["concurrency"], use_threads=True)  # fmt: skip
        client.upload_file(source, BUCKET, "boto3.bin", Config=config)
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
    transport.put_file(Path(source), "/spoold.bin", None, ctx)


def run_child(args: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child upload."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "bench.s3", "--child", *args], cwd=REPO, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"child {args[0]} failed with {process.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


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
    transport.put_file(source, "/spoold.bin", None, ctx)
    transport.close()
    return count, len(on_server), len(on_server & set(sent))


def main() -> None:
    import boto3

    size_mb = int(os.environ.get("SPOOLD_BENCH_MB", "256"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-s3-") as tmp:
        folder = Path(tmp)
        source = folder / "data.bin"
        block = os.urandom(16 * MiB)
        with open(source, "wb") as stream:
            for offset in range(0, size_mb * MiB, len(block)):
                stream.write(block[: min(len(block), size_mb * MiB - offset)])
        moto, endpoint = start_moto(folder / "moto.log")
        env = {**os.environ, **ENV}
        os.environ.update(ENV)
        try:
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            settings = _settings(endpoint)
            print(f"{size_mb} MiB, part_size {settings['part_size'] // MiB} MiB, concurrency "
                  f"{settings['concurrency']}, moto server at {endpoint}")  # fmt: skip
            results: dict[str, tuple[float, int]] = {}
            for method in ("boto3", "spoold", "boto3", "spoold"):
                seconds, rss = run_child([method, endpoint, str(source)], env)
                best = results.get(method)
                results[method] = (min(seconds, best[0]) if best else seconds, max(rss, best[1]) if best else rss)
                client.delete_object(Bucket=BUCKET, Key=f"{method}.bin")
            for method, (seconds, rss) in results.items():
                print(f"  {method:7s} {seconds:6.2f} s  {size_mb / seconds:7.1f} MiB/s  peak RSS {rss / MiB:6.1f} MiB")
            budget = settings["concurrency"] * settings["part_size"] / MiB + 80
            print(f"  ratio spoold/boto3 time: {results['spoold'][0] / results['boto3'][0]:.2f} (target <= 1.1)")
            print(f"  spoold peak RSS {results['spoold'][1] / MiB:.0f} MiB (target < concurrency x part_size + 80 MiB"
                  f" = {budget:.0f} MiB)")  # fmt: skip
            count, on_server, resent = resume_figure(endpoint, source, folder, env)
            print(f"  resume after SIGKILL at ~50%: {on_server} of {count} parts were on the server, "
                  f"{resent} of them sent again (target <= concurrency = {settings['concurrency']})")  # fmt: skip
        finally:
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
