"""spoold's s3:// download (`S3Transport.get_tree`) vs boto3's own `download_file`, from a local moto S3 server.

    python -m bench.s3_pull         # 256 MiB; SPOOLD_BENCH_MB=1024 for the 1 GiB figure

Same object, same part size (SPOOLD_BENCH_PART_MB, default 16) and concurrency
(SPOOLD_BENCH_CONCURRENCY, default 4), same server, same run, interleaved
(boto3, spoold, boto3, spoold, ...; SPOOLD_BENCH_ROUNDS, default 3), medians
printed. Each download runs in its own child process, which times only the
download (client made beforehand) and reports its wall time and the CPU of all
its threads. spoold does more than boto3 here: it verifies the object's sha256,
fsyncs each part before recording it in the checkpoint, and lands the file under
a temp name before renaming it. Targets: time <= 1.05x, client CPU <= 1.1x.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.s3 import BUCKET, ENV, REPO, MiB, start_moto, write_source

KEY = "pull/data.bin"


def _settings(endpoint: str) -> dict[str, Any]:
    part_mb = int(os.environ.get("SPOOLD_BENCH_PART_MB", "16"))
    concurrency = int(os.environ.get("SPOOLD_BENCH_CONCURRENCY", "4"))
    return {"endpoint_url": endpoint, "part_size": part_mb * MiB, "concurrency": concurrency}


def child(method: str, endpoint: str, folder: str) -> None:
    """One download in this process (`python -m bench.s3_pull --child ...`); prints {seconds, cpu} as JSON."""
    settings = _settings(endpoint)
    target = Path(folder) / method
    target.mkdir(exist_ok=True)
    if method == "boto3":
        import boto3
        from boto3.s3.transfer import TransferConfig

        client = boto3.client("s3", endpoint_url=endpoint)
        config = TransferConfig(multipart_threshold=settings["part_size"], multipart_chunksize=settings["part_size"],
                                max_concurrency=settings["concurrency"], use_threads=True)  # fmt: skip

        def download() -> None:
            client.download_file(BUCKET, KEY, str(target / "data.bin"), Config=config)
    else:
        from spoold.transports.base import TransferContext, parse_url
        from spoold.transports.s3 import S3Transport

        transport = S3Transport(parse_url(f"s3://{BUCKET}/"), settings)
        checkpoint: dict[str, Any] = {}
        ctx = TransferContext(progress=lambda _d, _t: None, checkpoint=checkpoint, save_checkpoint=lambda: None,
                              check_stop=lambda: None)  # fmt: skip

        def download() -> None:
            transport.get_tree(f"/{KEY}", target, ctx)

    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    download()
    seconds, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(json.dumps({"seconds": seconds, "cpu": cpu}))


def run_child(method: str, endpoint: str, folder: Path, env: dict[str, str]) -> dict[str, float]:
    reply = subprocess.run([sys.executable, "-m", "bench.s3_pull", "--child", method, endpoint, str(folder)],
                           cwd=REPO, env=env, check=True, capture_output=True, text=True)  # fmt: skip
    result: dict[str, float] = json.loads(reply.stdout.strip().splitlines()[-1])
    (folder / method / "data.bin").unlink()
    return result


def main() -> None:
    import boto3

    size_mb = int(os.environ.get("SPOOLD_BENCH_MB", "256"))
    rounds = int(os.environ.get("SPOOLD_BENCH_ROUNDS", "3"))
    with tempfile.TemporaryDirectory(prefix="spoold-bench-s3-pull-") as tmp:
        folder = Path(tmp)
        source = folder / "data.bin"
        sha256 = write_source(source, size_mb)
        moto, endpoint = start_moto(folder / "moto.log")
        env = {**os.environ, **ENV}
        os.environ.update(ENV)
        try:
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            # As `ship` leaves it: the sha256 in the metadata, which spoold verifies and boto3 does not.
            client.upload_file(str(source), BUCKET, KEY, ExtraArgs={"Metadata": {"sha256": sha256}})
            source.unlink()  # the page cache is the client's, not the source file's
            settings = _settings(endpoint)
            print(f"{size_mb} MiB download, part_size {settings['part_size'] // MiB} MiB, concurrency "
                  f"{settings['concurrency']}, {rounds} rounds interleaved, moto server at {endpoint}")  # fmt: skip
            results: dict[str, list[dict[str, float]]] = {"boto3": [], "spoold": []}
            for _ in range(rounds):
                for method, runs in results.items():
                    runs.append(run_child(method, endpoint, folder, env))
            medians = {m: {k: statistics.median(r[k] for r in runs) for k in ("seconds", "cpu")}
                       for m, runs in results.items()}  # fmt: skip
            for method, median in medians.items():
                print(f"  {method:7s} {median['seconds']:6.2f} s  {size_mb / median['seconds']:7.1f} MiB/s  "
                      f"client CPU {median['cpu']:6.2f} s")  # fmt: skip
            time_ratio = medians["spoold"]["seconds"] / medians["boto3"]["seconds"]
            cpu_ratio = medians["spoold"]["cpu"] / medians["boto3"]["cpu"]
            print(f"  ratio spoold/boto3 time: {time_ratio:.2f} (target <= 1.05)")
            print(f"  ratio spoold/boto3 client CPU: {cpu_ratio:.2f} (target <= 1.1)")
        finally:
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
