"""Shared queues (issue #14): items/s with 1, 2 and 3 nodes on one bucket, and S3 requests per item.

    python -m bench.shared                          # 300 items of 100 bytes, 1, 2 and 3 nodes
    SPOOLD_BENCH_SHARED_ITEMS=1000 SPOOLD_BENCH_SHARED_NODES=1,3 python -m bench.shared

Each round gets a fresh bucket on one moto S3 server (through tests/moto_launcher.py, as the tests run
it: conditional PUTs atomic, as real S3's are) and starts that many `spoold run` daemons, each on its own
spool with its own `host:`, sharing one queue (`claim: {lease: 5s}`, `poll: 0.5s`, concurrency
SPOOLD_BENCH_SHARED_CONCURRENCY, default 2, chain `checksum: sha256`). Once every node is ready the items
are put into `inbox/` with boto3 (8 threads); the clock runs from the first put until every item is in
`done/` and no claim is left. items/s is over that time; the scaling ratio is items/s over the 1-node
figure. Requests per item are the requests moto's werkzeug log shows for the round's bucket in that window
(listings while idle included), minus the bench's own (puts and the polls that watch for the end), over
the number of items; the target is at most 8. All nodes and moto share this machine's cores, so the
scaling ratio is a floor of what separate machines would give. "store load" is the round's requests per
second over what moto alone answers (small PUTs from 6 threads, measured first): near 1, the store is the
limit, not the nodes.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import wait_for  # noqa: E402
from tests.shared_fixtures import SharedBucket, moto_requests, node_config  # noqa: E402

from bench.s3 import start_moto  # noqa: E402

ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
REQUESTS_PER_ITEM_TARGET = 8.0
ITEM_BYTES = 100


class CountedBucket(SharedBucket):
    """A SharedBucket whose client counts the HTTP requests it sends (so the bench can leave its own out)."""

    sent = 0
    _lock = threading.Lock()

    @property
    def client(self) -> Any:
        fresh = self._client is None
        client = super().client
        if fresh:
            client.meta.events.register("before-send.s3", self._count)
        return client

    def _count(self, **_: Any) -> None:
        with self._lock:
            self.sent += 1


def start_node(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as stream:
        return subprocess.Popen([sys.executable, "-m", "spoold", "run", "-c", str(config)], stdout=stream,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=REPO,
                                env={**os.environ, **ENV})  # fmt: skip


def is_ready(process: subprocess.Popen[bytes], spool: Path, log: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"spoold exited with {process.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
    try:
        health = json.loads((spool / "health.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return bool(health.get("ready")) and health.get("pid") == process.pid


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def one_round(folder: Path, endpoint: str, moto_log: Path, nodes: int, items: int,
              concurrency: int) -> tuple[float, float]:  # fmt: skip
    """(seconds, daemon requests per item) for `items` items over `nodes` nodes."""
    bucket = CountedBucket(endpoint, f"spoold-bench-{uuid.uuid4().hex[:10]}").create()
    configs = [node_config(folder, f"node-{n}", bucket, argv=[], concurrency=concurrency,
                           steps=["checksum: {algorithms: [sha256]}"]) for n in range(nodes)]  # fmt: skip
    processes = [start_node(config, folder / f"{config.stem}.log") for config in configs]
    try:
        for process, config in zip(processes, configs, strict=True):
            spool, log = folder / config.stem / "spool", folder / f"{config.stem}.log"
            wait_for(functools.partial(is_ready, process, spool, log), 60, f"{config.stem} ready", interval=0.1)
        before_log = len(moto_requests(moto_log, bucket.name))
        before_own = bucket.sent
        names = [f"item-{n:05d}" for n in range(items)]
        body = os.urandom(ITEM_BYTES // 2).hex().encode()
        started = time.perf_counter()
        bucket.put_many((f"inbox/{name}", body) for name in names)
        want = set(names)
        wait_for(lambda: want <= set(bucket.keys("done/")), 30 + items, f"{items} items in done/", interval=0.2)
        elapsed = time.perf_counter() - started
        wait_for(lambda: not bucket.keys("claims/") and not bucket.keys("inbox/"), 30, "no claims left", interval=0.2)
        own = bucket.sent - before_own
        # moto logs a request once it has answered it; let the last ones reach the file.
        total = wait_for(lambda: len(moto_requests(moto_log, bucket.name)) - before_log >= own and
                           len(moto_requests(moto_log, bucket.name)) - before_log, 10, "moto's log")  # fmt: skip
    finally:
        stop(processes)
    return elapsed, (total - own) / items


def store_capacity(endpoint: str, requests: int = 600, threads: int = 6) -> float:
    """Requests per second moto answers for small PUTs from several boto3 clients at once: the store's ceiling."""
    bucket = SharedBucket(endpoint, f"spoold-bench-{uuid.uuid4().hex[:10]}").create()
    per_thread = requests // threads

    def put_some(n: int) -> None:
        for i in range(per_thread):
            bucket.put(f"capacity/{n}-{i}", b"x" * ITEM_BYTES)

    workers = [threading.Thread(target=put_some, args=(n,)) for n in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return per_thread * threads / (time.perf_counter() - started)


def main() -> None:
    items = int(os.environ.get("SPOOLD_BENCH_SHARED_ITEMS", "300"))
    counts = [int(n) for n in os.environ.get("SPOOLD_BENCH_SHARED_NODES", "1,2,3").split(",")]
    concurrency = int(os.environ.get("SPOOLD_BENCH_SHARED_CONCURRENCY", "2"))
    os.environ.update(ENV)
    with tempfile.TemporaryDirectory(prefix="spoold-bench-shared-") as tmp:
        folder = Path(tmp)
        moto_log = folder / "moto.log"
        moto, endpoint = start_moto(moto_log)
        try:
            print(f"{items} items of {ITEM_BYTES} bytes, chain checksum, concurrency {concurrency} per node, "
                  f"{os.cpu_count()} CPUs shared by moto and every node, moto at {endpoint}", flush=True)  # fmt: skip
            capacity = store_capacity(endpoint)
            print(f"moto alone answers {capacity:.0f} small PUTs/s from 6 boto3 threads on this machine", flush=True)
            print(f"{'nodes':>5}  {'seconds':>8}  {'items/s':>8}  {'vs 1 node':>9}  {'requests/item':>13}  "
                  f"{'store load':>10}  target", flush=True)  # fmt: skip
            base: float | None = None
            for nodes in counts:
                round_folder = folder / f"nodes-{nodes}"
                round_folder.mkdir()
                seconds, per_item = one_round(round_folder, endpoint, moto_log, nodes, items, concurrency)
                rate = items / seconds
                base = base or (rate if nodes == 1 else None)
                ratio = f"{rate / base:8.2f}x" if base else f"{'-':>9}"
                verdict = "ok" if per_item <= REQUESTS_PER_ITEM_TARGET else "MISSED"
                load = rate * per_item / capacity
                print(f"{nodes:>5}  {seconds:8.2f}  {rate:8.1f}  {ratio}  {per_item:13.2f}  {load:10.2f}  "
                      f"<= {REQUESTS_PER_ITEM_TARGET:g} {verdict}", flush=True)  # fmt: skip
        finally:
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    main()
