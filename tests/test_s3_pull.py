"""pull and fetch from s3:// through the real daemon, against moto's S3 server (real HTTP, real boto3).

What the server saw is read from moto's own request log (`moto_s3_log`: one werkzeug line per request), so
"the second pull was a cache hit" and "the restart fetched only the missing parts" are the server's word.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from spoold.daemon.config import parse_config
from spoold.errors import ConfigError
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
MiB = 1 << 20
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
RETRY_ONCE = {"attempts": 1, "delays": ["0s"]}


@pytest.fixture
def client(moto_s3: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=moto_s3, region_name=ENV["AWS_DEFAULT_REGION"],
                        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])


@pytest.fixture
def bucket(client: Any) -> str:
    name = f"spoold-pull-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return name


def put(client: Any, bucket: str, key: str, data: bytes, recorded: str | None = "real") -> str:
    """Upload as `ship` does (the sha256 in the metadata); `recorded=None` leaves it out, else it may lie."""
    digest = hashlib.sha256(data).hexdigest()
    metadata = {} if recorded is None else {"sha256": digest if recorded == "real" else recorded}
    client.put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata)
    return digest


class ServerLog:
    """Counts of the requests moto logged, by method and key."""

    def __init__(self, path: Path, bucket: str) -> None:
        self.path = path
        self.bucket = bucket

    def mark(self) -> int:
        return self.path.stat().st_size

    def count(self, method: str, key: str, since: int = 0) -> int:
        text = self.path.read_bytes()[since:].decode("utf-8", "replace")
        # Lines other than 200 are coloured: `"\x1b[35m\x1b[1mGET /bucket/key HTTP/1.1\x1b[0m" 206 -`.
        pattern = rf'"(?:\x1b\[[0-9;]*m)*{method} /{re.escape(self.bucket)}/{re.escape(quote(key))} HTTP/'
        return len(re.findall(pattern, text))


@pytest.fixture
def server_log(moto_s3_log: Path, bucket: str) -> ServerLog:
    return ServerLog(moto_s3_log, bucket)


def s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    return {"endpoint_url": endpoint, "part_size": "1MiB", "concurrency": 3, **extra}


def pull_queue(step: dict[str, Any], retry: dict[str, Any] = RETRY_ONCE) -> dict[str, Any]:
    return {"items": "requests", "settle": "0s", "retry": retry, "chain": [{"pull": step}]}


def start(daemon: Start, write_config: WriteConfig, queues: dict[str, Any], **top: Any) -> DaemonProcess:
    return daemon(write_config(json.dumps({"spool": "{spool}", **top, "queues": queues})), env=ENV)


class Requests:
    """Drops numbered requests into a queue's inbox and waits for their end."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.count = 0

    def run(self, queue: str, fields: dict[str, Any], state: str = "done", timeout: float = 30) -> dict[str, Any]:
        self.count += 1
        name = f"r{self.count}"
        inbox = self.spool / queue / "inbox"
        (inbox / f".{name}.tmp").write_text(json.dumps(fields))
        os.rename(inbox / f".{name}.tmp", inbox / f"{name}.json")
        doc: dict[str, Any] = wait_for(sidecar_state(self.spool, queue, name, state), timeout, f"{queue}/{name}")
        return doc


@pytest.fixture
def requests(spool: Path) -> Requests:
    return Requests(spool)


def tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# -- objects and prefixes --------------------------------------------------------------------------------------


def test_pull_small_object_and_large_object_in_ranged_parts(
    daemon: Start, write_config: WriteConfig, moto_s3: str, client: Any, bucket: str, tmp_path: Path,
    requests: Requests, server_log: ServerLog,
) -> None:  # fmt: skip
    small, large = os.urandom(1000), os.urandom(5 * MiB + MiB // 2)  # 6 parts of 1MiB
    put(client, bucket, "in/small.json", small)
    put(client, bucket, "in/large.bin", large)
    step = {"from": "{url}", "to": "file://{tmp}/out/", **s3_options(moto_s3)}
    start(daemon, write_config, {"pulls": pull_queue(step)})
    for key in ("in/small.json", "in/large.bin"):
        doc = requests.run("pulls", {"url": f"s3://{bucket}/{key}"})
        assert doc["steps"][0]["result"]["to"] == [str(tmp_path / "out" / key.split("/")[1])]
    assert tree(tmp_path / "out") == {"large.bin": large, "small.json": small}, "no partial file is left"
    assert server_log.count("GET", "in/small.json") == 1
    assert server_log.count("GET", "in/large.bin") == 6, "one ranged GET per part"


def test_pull_prefix_into_a_folder_and_into_an_exact_target(
    daemon: Start, write_config: WriteConfig, moto_s3: str, client: Any, bucket: str, tmp_path: Path,
    requests: Requests,
) -> None:  # fmt: skip
    files = {"config.json": b'{"layers": 2}', "weights.bin": os.urandom(2 * MiB + 5), "sub/tok.txt": b"a b c",
             "sub/deeper/x.bin": os.urandom(100)}  # fmt: skip
    for relative, data in files.items():
        put(client, bucket, f"runs/run1/{relative}", data, recorded="real" if relative != "sub/tok.txt" else None)
    client.put_object(Bucket=bucket, Key="runs/run1/sub/", Body=b"")  # a folder marker, as consoles make them
    client.put_object(Bucket=bucket, Key="runs/run10/other.bin", Body=b"not below runs/run1/")
    options = s3_options(moto_s3)
    start(daemon, write_config, {
        "keep": pull_queue({"from": f"s3://{bucket}/runs/run1/", "to": "file://{tmp}/keep/", **options}),
        "exact": pull_queue({"from": f"s3://{bucket}/runs/run1", "to": "file://{tmp}/models/{repo_id}", **options}),
    })  # fmt: skip
    requests.run("keep", {})
    requests.run("exact", {"repo_id": "m1"})
    expected: dict[str, bytes | None] = {"sub": None, "sub/deeper": None, **files}
    expected = dict(sorted(expected.items()))
    assert tree(tmp_path / "keep") == {"run1": None, **{f"run1/{k}": v for k, v in expected.items()}}
    assert tree(tmp_path / "models" / "m1") == expected, "the prefix's contents land directly in the exact target"


class Gate:
    """A TCP proxy in front of moto that lets `budget` bytes of replies through, then holds them until `open()`."""

    def __init__(self, target: int, budget: int) -> None:
        self.target = target
        self.budget = budget
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.opened = threading.Event()
        self.closing = threading.Event()
        self.sockets: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def open(self) -> None:
        self.opened.set()

    def close(self) -> None:
        self.closing.set()
        self.opened.set()
        self.listener.close()
        with self.lock:
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        for thread in self.threads:
            thread.join(timeout=10)

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                near, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            far = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.sockets += [near, far]
            for args in ((near, far, False), (far, near, True)):
                thread = threading.Thread(target=self._pipe, args=args, daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pipe(self, source: socket.socket, sink: socket.socket, is_reply: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                while data:
                    with self.lock:
                        take = len(data) if self.opened.is_set() or not is_reply else min(len(data), self.budget)
                        if is_reply and not self.opened.is_set():
                            self.budget -= take
                    if take:
                        sink.sendall(data[:take])
                        data = data[take:]
                    elif self.opened.wait(0.1) and self.closing.is_set():
                        return
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


@pytest.fixture
def gate(moto_s3: str) -> Iterator[Gate]:
    made = Gate(int(urlsplit(moto_s3).port or 0), budget=3 * MiB + MiB // 2)
    yield made
    made.close()


def test_restart_after_kill_fetches_only_the_parts_not_recorded(
    daemon: Start, write_config: WriteConfig, client: Any, bucket: str, tmp_path: Path, spool: Path,
    server_log: ServerLog, gate: Gate,
) -> None:  # fmt: skip
    data = os.urandom(8 * MiB)  # 8 parts; the gate lets about 3.5 of them through
    put(client, bucket, "big.bin", data)
    step = {"from": f"s3://{bucket}/big.bin", "to": "file://{tmp}/out/",
            **s3_options(f"http://127.0.0.1:{gate.port}", concurrency=2)}  # fmt: skip
    config = write_config(json.dumps({"spool": "{spool}", "queues": {"pulls": pull_queue(step)}}))
    first = daemon(config, env=ENV)
    (spool / "pulls" / "inbox" / "r1.json").write_text("{}")

    def recorded() -> list[list[int]] | None:
        doc = read_sidecar(spool, "pulls", "r1")
        done = (doc or {"steps": [{}]})["steps"][0].get("checkpoint", {}).get("transfer", {}).get("done", [])
        return done if sum(b - a + 1 for a, b in done) >= 2 else None

    wait_for(recorded, 30, "two parts recorded in the checkpoint")
    first.kill()
    done = recorded()  # what the killed daemon had made durable
    assert done is not None
    kept = sum(b - a + 1 for a, b in done)
    assert kept < 8, "the download finished before the kill; the test proves nothing"
    assert (tmp_path / "out" / ".big.bin.spoold.part").exists()
    mark = server_log.mark()
    gate.open()
    second = daemon(config, env=ENV)
    wait_for(sidecar_state(spool, "pulls", "r1", "done"), 30, "resumed pull done")
    assert (tmp_path / "out" / "big.bin").read_bytes() == data
    assert server_log.count("GET", "big.bin", since=mark) == 8 - kept, "recorded parts are never fetched again"
    assert f"resuming: {kept} of 8 parts already here" in second.log()


def test_object_whose_bytes_do_not_match_its_sha256_is_retried_then_failed(
    daemon: Start, write_config: WriteConfig, moto_s3: str, client: Any, bucket: str, tmp_path: Path,
    requests: Requests, server_log: ServerLog,
) -> None:  # fmt: skip
    put(client, bucket, "bad.bin", os.urandom(3 * MiB), recorded=hashlib.sha256(b"other bytes").hexdigest())
    retry = {"attempts": 2, "delays": ["0s"]}
    queues = {"pulls": pull_queue({"from": f"s3://{bucket}/bad.bin", "to": "file://{tmp}/out/", **s3_options(moto_s3)},
                                  retry)}  # fmt: skip
    start(daemon, write_config, queues)
    doc = requests.run("pulls", {}, state="failed")
    assert doc["error"]["type"] == "checksum_mismatch", doc["error"]
    assert "discarded" in doc["error"]["message"]
    assert server_log.count("GET", "bad.bin") == 2 * 3, "two attempts of three parts: a bad download is not resumed"
    assert tree(tmp_path / "out") == {}, "neither the file nor its partial is kept"


@pytest.mark.parametrize("hostile", ["../x", "a//b", "./x", "n" * 300])
def test_hostile_key_below_a_prefix_is_refused(
    daemon: Start, write_config: WriteConfig, moto_s3: str, client: Any, bucket: str, tmp_path: Path,
    requests: Requests, hostile: str,
) -> None:  # fmt: skip
    put(client, bucket, "ds/fine.txt", b"fine")
    put(client, bucket, f"ds/{hostile}", b"planted")
    start(daemon, write_config, {"pulls": pull_queue({"from": f"s3://{bucket}/ds/", "to": "file://{tmp}/out/land/",
                                                     **s3_options(moto_s3)})})  # fmt: skip
    doc = requests.run("pulls", {}, state="failed")
    assert doc["error"]["type"] == "permanent"
    assert "single path component" in doc["error"]["message"], doc["error"]
    assert not (tmp_path / "out" / "x").exists() and not (tmp_path / "out" / "land" / "ds").exists()


def test_fetch_request_with_s3_urls(
    daemon: Start, write_config: WriteConfig, moto_s3: str, client: Any, bucket: str, spool: Path,
    requests: Requests,
) -> None:  # fmt: skip
    clip, big = b"c" * 1000, os.urandom(2 * MiB + 7)
    put(client, bucket, "cam/clip.mp4", clip)
    put(client, bucket, "cam/big #1.mp4", big)  # `#` is part of an S3 key, not a fragment
    start(daemon, write_config, {
        "requests": {"items": "requests", "settle": "0s", "retry": RETRY_ONCE,
                     "chain": [{"fetch": {"into": "clips", **s3_options(moto_s3)}}]},
        "clips": {"settle": "0s", "chain": [{"checksum": {"algorithms": ["sha256"]}}]},
    })  # fmt: skip
    files = [{"url": f"s3://{bucket}/cam/clip.mp4", "sha256": hashlib.sha256(clip).hexdigest()},
             {"url": f"s3://{bucket}/cam/big #1.mp4", "size": len(big)}]  # fmt: skip
    doc = requests.run("requests", {"files": files, "fields": {"session": "s1"}})
    items = doc["steps"][0]["result"]["items"]
    assert sorted(items) == ["big #1.mp4", "clip.mp4"]
    for name, data in (("clip.mp4", clip), ("big #1.mp4", big)):
        got = wait_for(sidecar_state(spool, "clips", items[name], "done"), 30, f"{name} checksummed")
        assert got["fields"]["session"] == "s1"
        assert next(iter(got["digests"].values()))["sha256"] == hashlib.sha256(data).hexdigest()
    missing = requests.run("requests", {"urls": [f"s3://{bucket}/cam/nope.mp4"]}, state="failed")
    assert "not found" in missing["error"]["message"] and "nope.mp4" in missing["error"]["message"]


# -- the cache ---------------------------------------------------------------------------------------------------


class Worker:
    """Field note 003's worker: jobs name a dataset on S3, pulled into queue `datasets` through the cache."""

    def __init__(self, daemon: Start, write_config: WriteConfig, moto_s3: str, tmp_path: Path, requests: Requests,
                 spool: Path, max_size: str = "3MiB") -> None:  # fmt: skip
        self.cache = tmp_path / "cache"
        self.requests, self.spool = requests, spool
        queues = {
            "jobs": pull_queue({"from": "{dataset}", "to": "queue:datasets", "cache": True, **s3_options(moto_s3)}),
            "datasets": {"settle": "0s", "chain": [{"checksum": {"algorithms": ["sha256"]}}]},
        }
        self.run = start(daemon, write_config, queues, cache={"path": "{tmp}/cache", "max": max_size})

    def pull(self, url: str) -> str:
        """Run one job; the sha256 of the dataset item it made, once that item is done."""
        job = self.requests.run("jobs", {"dataset": url})
        item = job["steps"][0]["result"]["item"]
        doc = wait_for(sidecar_state(self.spool, "datasets", item, "done"), 30, f"dataset {item}")
        digest: str = next(iter(doc["digests"].values()))["sha256"]
        return digest

    def entry(self, digest: str) -> Path:
        return self.cache / "sha256" / digest


@pytest.fixture
def worker(daemon: Start, write_config: WriteConfig, moto_s3: str, tmp_path: Path, requests: Requests,
           spool: Path) -> Worker:  # fmt: skip
    return Worker(daemon, write_config, moto_s3, tmp_path, requests, spool)


def test_second_pull_of_a_dataset_is_a_cache_hit(
    worker: Worker, client: Any, bucket: str, server_log: ServerLog
) -> None:
    digest = put(client, bucket, "ds1.tar", os.urandom(MiB + MiB // 2))  # two ranged parts
    assert worker.pull(f"s3://{bucket}/ds1.tar") == digest
    assert server_log.count("GET", "ds1.tar") == 2
    assert worker.entry(digest).stat().st_nlink >= 2, "the dataset item and the cache share one copy"
    mark = server_log.mark()
    assert worker.pull(f"s3://{bucket}/ds1.tar") == digest
    assert server_log.count("GET", "ds1.tar", since=mark) == 0, "the second pull downloaded nothing"
    assert server_log.count("HEAD", "ds1.tar", since=mark) == 1
    assert "served from the cache" in worker.run.log()


def test_least_recently_used_entries_are_evicted_beyond_max(
    worker: Worker, client: Any, bucket: str, server_log: ServerLog
) -> None:
    digests = {name: put(client, bucket, name, os.urandom(MiB + MiB // 5)) for name in ("a", "b", "c")}
    for name in ("a", "b", "c"):  # 3.6MiB in all: more than max 3MiB
        worker.pull(f"s3://{bucket}/{name}")
    assert not worker.entry(digests["a"]).exists(), "the least recently used entry is evicted"
    assert worker.entry(digests["b"]).exists() and worker.entry(digests["c"]).exists()
    mark = server_log.mark()
    worker.pull(f"s3://{bucket}/c")  # a hit: c is now the most recently used
    worker.pull(f"s3://{bucket}/a")  # a miss, downloaded and cached again; b is now the oldest
    assert server_log.count("GET", "c", since=mark) == 0
    assert server_log.count("GET", "a", since=mark) == 2
    assert worker.entry(digests["a"]).exists() and worker.entry(digests["c"]).exists()
    assert not worker.entry(digests["b"]).exists()


def test_cached_file_whose_bytes_changed_is_not_served(
    worker: Worker, client: Any, bucket: str, server_log: ServerLog
) -> None:
    data = os.urandom(MiB + 3)
    digest = put(client, bucket, "ds.tar", data)
    worker.pull(f"s3://{bucket}/ds.tar")
    entry = worker.entry(digest)
    before = entry.stat()
    with open(entry, "r+b") as stream:  # one byte changed in place: same size, same mtime
        stream.seek(1000)
        stream.write(bytes([data[1000] ^ 0xFF]))
    os.utime(entry, ns=(before.st_atime_ns, before.st_mtime_ns))
    mark = server_log.mark()
    assert worker.pull(f"s3://{bucket}/ds.tar") == digest, "the new dataset item holds the real bytes"
    assert server_log.count("GET", "ds.tar", since=mark) == 2, "downloaded again, not served from the cache"
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == digest, "the entry was replaced by the good download"
    assert "no longer holds its content" in worker.run.log()


def test_cache_on_a_step_needs_the_top_level_cache() -> None:
    text = json.dumps({"spool": "/tmp/s", "queues": {
        "jobs": {"items": "requests", "chain": [{"pull": {"from": "{d}", "to": "queue:datasets", "cache": True}}]},
        "datasets": {"chain": ["checksum"]},
    }})  # fmt: skip
    with pytest.raises(ConfigError, match=r"queues\.jobs\.chain\[0\]\.pull\.cache.*top-level"):
        parse_config(text, "spoold.yaml")
    config = parse_config(text.replace('{"spool"', '{"cache": {"path": "/tmp/c", "max": "1GiB"}, "spool"'), "x.yaml")
    assert config.cache is not None and config.cache.max_bytes == 1 << 30


def test_a_field_may_name_a_remote_dataset_but_not_a_local_path(worker: Worker, requests: Requests,
                                                                   spool: Path) -> None:  # fmt: skip
    doc = requests.run("jobs", {"dataset": "file:///etc/passwd"}, state="failed")
    assert doc["error"]["type"] == "permanent"
    assert "must be written in the config" in doc["error"]["message"]
    assert not any((spool / "datasets").rglob("passwd"))


# -- the transport on its own, stopped at chosen points -------------------------------------------------------


def transport_and_context(moto_s3: str, bucket: str, checkpoint: dict[str, Any],
                          check_stop: Callable[[], None]) -> tuple[Any, Any]:  # fmt: skip
    from spoold.transports.base import TransferContext, parse_url
    from spoold.transports.s3 import S3Transport

    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": moto_s3, "part_size": MiB,
                                                           "concurrency": 2})  # fmt: skip
    ctx = TransferContext(progress=lambda _d, _t: None, checkpoint=checkpoint, save_checkpoint=lambda: None,
                          check_stop=check_stop)  # fmt: skip
    return transport, ctx


def test_prefix_pull_goes_on_after_the_last_key_that_landed(
    moto_s3: str, client: Any, bucket: str, tmp_path: Path, server_log: ServerLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spoold.errors import Interrupted

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    files = {f"f{n:02d}": os.urandom(10_000) for n in range(12)} | {"g.bin": os.urandom(2 * MiB + 1)}
    for name, data in files.items():
        put(client, bucket, f"p/{name}", data)
    checkpoint: dict[str, Any] = {}

    def stop_midway() -> None:
        if checkpoint.get("after", "") >= "p/f05":
            raise Interrupted("stopping, as a daemon would on SIGTERM")

    transport, ctx = transport_and_context(moto_s3, bucket, checkpoint, stop_midway)
    with pytest.raises(Interrupted):
        transport.get_tree("/p/", tmp_path, ctx)
    transport.close()
    after = checkpoint["after"]
    assert "p/f05" <= after < "p/g.bin"
    mark = server_log.mark()
    transport, ctx = transport_and_context(moto_s3, bucket, checkpoint, lambda: None)
    assert transport.get_tree("/p/", tmp_path, ctx) == [tmp_path / "p"]
    transport.close()
    assert tree(tmp_path / "p") == files
    for name in files:
        again = server_log.count("GET", f"p/{name}", since=mark)
        assert again == (0 if f"p/{name}" <= after else 3 if name == "g.bin" else 1), name


def test_an_object_replaced_while_downloading_starts_again(
    moto_s3: str, client: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spoold.errors import TransientError

    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    old, new = os.urandom(4 * MiB), os.urandom(4 * MiB)
    put(client, bucket, "v.bin", old)
    checkpoint: dict[str, Any] = {}
    replaced = threading.Event()

    def replace_once() -> None:
        if not replaced.is_set():
            replaced.set()
            put(client, bucket, "v.bin", new)

    transport, ctx = transport_and_context(moto_s3, bucket, checkpoint, replace_once)
    with pytest.raises(TransientError, match="changed while it was downloaded"):
        transport.get_tree("/v.bin", tmp_path, ctx)
    transport.close()
    assert checkpoint == {}, "parts of the old version are never resumed"
    transport, ctx = transport_and_context(moto_s3, bucket, checkpoint, lambda: None)
    transport.get_tree("/v.bin", tmp_path, ctx)
    transport.close()
    assert (tmp_path / "v.bin").read_bytes() == new
