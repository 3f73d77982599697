"""The instruments of tests/test_shared_queue.py, checked against moto itself (no daemon).

A shared-queue test is only as good as the store it runs against: moto's server through tests/moto_launcher.py
(its `put_object` serialised, so `If-None-Match: *` / `If-Match` writes are atomic as in real S3), the header
stripping proxy that stands for a store ignoring conditions, the partition in front of moto, and the request
counts read from moto's werkzeug log. Each is shown here to do what those tests rely on.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.shared_fixtures import S3_ENV, HttpProxy, Partition, SharedBucket, moto_requests, writes_by_key


@pytest.fixture
def bucket(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> SharedBucket:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return SharedBucket(moto_s3, f"spoold-store-{uuid.uuid4().hex[:12]}").create()


@pytest.fixture
def proxies() -> Iterator[list[HttpProxy]]:
    made: list[HttpProxy] = []
    yield made
    for proxy in made:
        proxy.close()


def put_if_none_match(client: object, bucket: str, key: str, body: bytes) -> int:
    """The HTTP status of a create-only PUT (200, or 412 when the object exists)."""
    import botocore.exceptions

    try:
        client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")  # type: ignore[attr-defined]
    except botocore.exceptions.ClientError as exc:
        return int(exc.response["ResponseMetadata"]["HTTPStatusCode"])
    return 200


def test_racing_create_only_puts_have_one_winner_on_moto(bucket: SharedBucket) -> None:
    """The launcher's serialised PUTs: 16 racing `If-None-Match: *` creates, exactly one 200, the rest 412."""
    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda n: put_if_none_match(bucket.client, bucket.name, "jobs/claims/x.json",
                                                          f'{{"node": "n{n}"}}'.encode()), range(16)))  # fmt: skip
    assert sorted(codes) == [200] + [412] * 15


def test_the_stripping_proxy_is_a_store_that_ignores_conditions(bucket: SharedBucket,
                                                                proxies: list[HttpProxy]) -> None:  # fmt: skip
    through = HttpProxy(bucket.endpoint)
    stripping = HttpProxy(bucket.endpoint, strip={"if-none-match", "if-match"})
    proxies += [through, stripping]
    key = "jobs/claims/probe.json"
    plain = SharedBucket(through.endpoint, bucket.name).client
    assert put_if_none_match(plain, bucket.name, key, b"1") == 200
    assert put_if_none_match(plain, bucket.name, key, b"2") == 412, "the plain proxy keeps the condition"
    ignoring = SharedBucket(stripping.endpoint, bucket.name).client
    assert put_if_none_match(ignoring, bucket.name, key, b"3") == 200, "the stripping proxy drops it"
    assert bucket.get("claims/probe.json") == b"3"
    assert stripping.stripped >= 1 and through.stripped == 0
    # Reads, HEADs and listings still go through both.
    assert [k for k in SharedBucket(stripping.endpoint, bucket.name).keys("claims/")] == ["probe.json"]


def test_the_proxy_hook_deletes_an_object_between_list_and_get(bucket: SharedBucket,
                                                               proxies: list[HttpProxy]) -> None:  # fmt: skip
    seen: list[tuple[str, str]] = []

    def vanish(method: str, name: str, key: str) -> None:
        seen.append((method, key))
        if method in ("GET", "HEAD") and key == "jobs/inbox/victim":
            bucket.delete("inbox/victim")

    proxy = HttpProxy(bucket.endpoint, before=vanish)
    proxies.append(proxy)
    bucket.put("inbox/victim", b"v")
    through = SharedBucket(proxy.endpoint, bucket.name)
    assert through.keys("inbox/") == ["victim"]
    assert through.get("inbox/victim") is None, "listed, then gone when fetched"
    assert ("GET", "jobs/inbox/victim") in seen


def test_a_partition_blackholes_then_heals(moto_s3: str) -> None:
    host, port = "127.0.0.1", int(moto_s3.rsplit(":", 1)[1])
    partition = Partition(f"http://{host}:{port}")
    try:
        def status_line(timeout: float) -> bytes:
            with socket.create_connection(("127.0.0.1", partition.proxy.port), timeout=timeout) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(12)

        assert status_line(5).startswith(b"HTTP/1.")
        partition.down()
        with pytest.raises(TimeoutError):
            status_line(0.5)
        result: list[bytes | BaseException] = []

        def blocked() -> None:
            try:
                result.append(status_line(10))
            except OSError as exc:
                result.append(exc)

        waiting = threading.Thread(target=blocked)
        waiting.start()
        wait_for(lambda: partition.proxy.connections >= 3, 5, "the blocked connection accepted")
        partition.heal()
        waiting.join(timeout=10)
        assert result and (result[0] == b"" or isinstance(result[0], OSError)), "a wedged connection is cut"
        assert status_line(5).startswith(b"HTTP/1."), "new connections go through after heal"
    finally:
        partition.close()


def test_moto_log_counts_writes_per_key(bucket: SharedBucket, moto_s3_log: Path) -> None:
    bucket.put("done/a", b"1")
    bucket.put("done/a", b"2")
    bucket.client.copy_object(Bucket=bucket.name, Key="jobs/done/b", CopySource={"Bucket": bucket.name,
                                                                                 "Key": "jobs/done/a"})  # fmt: skip
    put_if_none_match(bucket.client, bucket.name, "jobs/done/b", b"refused")

    def counted() -> dict[str, int] | None:
        counts = writes_by_key(moto_requests(moto_s3_log, bucket.name), "jobs/done/")
        return counts if counts == {"jobs/done/a": 2, "jobs/done/b": 1} else None

    assert wait_for(counted, 5, "moto's log lines")
    assert any(r.status == 412 for r in moto_requests(moto_s3_log, bucket.name)), "refused writes are not counted"
