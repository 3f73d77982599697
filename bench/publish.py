"""`publish` under contention: many writers updating one S3 document vs one writer alone, on a local moto server.

    python -m bench.publish    # 8 writers x 25 vs 1 x 200; SPOOLD_BENCH_WRITERS, _UPDATES, _ROUNDS (3)

Driven at the transport level: each writer is its own process running the loop the `publish` step runs
(`spoold.handlers.publish.publish`: read with the ETag, apply, conditional PUT, jittered backoff on a
conflict) over its own `S3Transport`, with the step's real backoff sleeps; no daemon, so the figure is
the protocol's, not the scheduler's. The writers start together on a signal. moto runs through
tests/moto_launcher.py (as the tests do), which makes its conditional PUTs atomic as real S3's are.
The two runs alternate and the best of each counts (on a small shared machine one run's figure is
mostly its neighbours' load). Printed: updates/s and conflicts of every run, and whether every update
is in the document (a lost update fails the benchmark). Target: no lost update, and contended
throughput at least half a single writer's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.s3 import start_moto  # noqa: E402

BUCKET = "spoold-bench-publish"
ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def child(endpoint: str, key: str, writer: str, count: str) -> None:
    """One writer (run as `python -m bench.publish --child ...`): ready, wait for `go`, publish, report."""
    from spoold.handlers.publish import Change, publish
    from spoold.transports.base import parse_url
    from spoold.transports.s3 import S3Transport

    transport = S3Transport(parse_url(f"s3://{BUCKET}/"), {"endpoint_url": endpoint})
    transport.client.head_bucket(Bucket=BUCKET)  # connect before the clock starts
    print("ready", flush=True)
    sys.stdin.readline()
    conflicts = 0
    for n in range(int(count)):
        change = Change(removes=[], sets=[(("entries", f"{writer}-{n}"), {"writer": writer, "n": n})])
        conflicts += publish(transport, key, change, retries=1000, sleep=time.sleep, shown=key).conflicts
    print(json.dumps({"conflicts": conflicts}), flush=True)
    transport.close()


def run(endpoint: str, key: str, writers: int, updates_each: int) -> tuple[float, int]:
    """Seconds from the common start until the last writer finished, and the conflicts of all writers."""
    env = {**os.environ, **ENV}
    argv = [sys.executable, "-m", "bench.publish", "--child", endpoint, key]
    pipes: dict[str, Any] = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    processes = [subprocess.Popen([*argv, f"w{w}", str(updates_each)], cwd=REPO, env=env, **pipes)
                 for w in range(writers)]  # fmt: skip
    for process in processes:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "ready":
            raise RuntimeError("a writer did not start")
    start = time.perf_counter()
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    conflicts = 0
    for process in processes:
        out, _ = process.communicate(timeout=600)
        if process.returncode:
            raise RuntimeError(f"a writer failed with {process.returncode}")
        conflicts += json.loads(out.strip().splitlines()[-1])["conflicts"]
    return time.perf_counter() - start, conflicts


def check_document(client: Any, key: str, writers: int, updates_each: int) -> None:
    entries = json.loads(client.get_object(Bucket=BUCKET, Key=key.lstrip("/"))["Body"].read())["entries"]
    expected = {f"w{w}-{n}" for w in range(writers) for n in range(updates_each)}
    lost = expected - set(entries)
    if lost:
        raise RuntimeError(f"{key}: {len(lost)} of {len(expected)} updates lost, e.g. {sorted(lost)[:3]}")


def main() -> None:
    import boto3

    writers = int(os.environ.get("SPOOLD_BENCH_WRITERS", "8"))
    total = int(os.environ.get("SPOOLD_BENCH_UPDATES", "200"))
    each = max(1, total // writers)
    total = each * writers
    with tempfile.TemporaryDirectory(prefix="spoold-bench-publish-") as tmp:
        moto, endpoint = start_moto(Path(tmp) / "moto.log")
        os.environ.update(ENV)
        try:
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            print(f"{total} updates to one s3:// document, moto (conditional PUTs atomic) at {endpoint}")
            rounds = int(os.environ.get("SPOOLD_BENCH_ROUNDS", "3"))
            best: dict[str, float] = {}
            setups = (("1 writer", 1, total), (f"{writers} writers", writers, each))
            for turn in range(rounds):
                for label, count, per_writer in setups:
                    key = f"/{turn}/{label.replace(' ', '-')}/manifest.json"
                    seconds, conflicts = run(endpoint, key, count, per_writer)
                    check_document(client, key, count, per_writer)
                    best[label] = max(best.get(label, 0.0), total / seconds)
                    print(f"  {label:11s} x {per_writer:3d} updates: {seconds:6.2f} s  {total / seconds:7.1f} updates/s"
                          f"  {conflicts:4d} conflicts ({conflicts / total:.2f} per update), none lost")  # fmt: skip
            single, contended = best["1 writer"], best[f"{writers} writers"]
            verdict = "ok" if contended >= single / 2 else "MISSED"
            load = os.getloadavg()[0]
            print(f"  best of {rounds}: {single:.1f} vs {contended:.1f} updates/s; contended / single writer "
                  f"throughput {contended / single:.2f} (target >= 0.5: {verdict}); load {load:.1f}")  # fmt: skip
        finally:
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
