"""S3 multipart parts are streamed from the file, never held in memory whole (issue #16).

Against moto's S3 server on loopback: the daemon's peak RSS (VmHWM) over a ship with large parts stays far below
`concurrency x part_size`; in-process, tracemalloc's peak stays below one part; the content, the multipart ETag
and the part checksums still verify, a stopped upload resumes sending only the missing parts, and a part whose
send is cut half-way is rewound and sent whole by botocore's retry.
"""

from __future__ import annotations

import hashlib
import os
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import pytest

from spoold.errors import Interrupted, PermanentError
from spoold.transports.base import TransferContext, parse_url
from spoold.transports.s3 import S3Transport
from spoold.transports.s3_parts import KnownPayloadAuth, PartBody, part_exceptions, range_digests
from tests.conftest import DaemonProcess, sidecar_state, wait_for

MIB = 1 << 20
DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def endpoint(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    return moto_s3


@pytest.fixture
def bucket(endpoint: str) -> str:
    import boto3

    name = f"spoold-stream-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def write_random(path: Path, size: int) -> str:
    """A file of `size` random bytes, written 4 MiB at a time; its hex sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as stream:
        for offset in range(0, size, 4 * MIB):
            block = os.urandom(min(4 * MIB, size - offset))
            digest.update(block)
            stream.write(block)
    return digest.hexdigest()


def multipart_etag(path: Path, part_size: int) -> str:
    """S3's ETag of a multipart object: the MD5 of its parts' MD5s, then `-count`."""
    md5s = []
    with open(path, "rb") as stream:
        while block := stream.read(part_size):
            md5s.append(hashlib.md5(block, usedforsecurity=False).digest())
    return f"{hashlib.md5(b''.join(md5s), usedforsecurity=False).hexdigest()}-{len(md5s)}"


def object_sha256(endpoint: str, bucket: str, key: str) -> str:
    digest = hashlib.sha256()
    for chunk in client(endpoint).get_object(Bucket=bucket, Key=key)["Body"].iter_chunks(4 * MIB):
        digest.update(chunk)
    return digest.hexdigest()


def context(checkpoint: dict[str, Any], check_stop: Any = lambda: None) -> TransferContext:
    return TransferContext(progress=lambda _d, _t: None, checkpoint=checkpoint, save_checkpoint=lambda: None,
                           check_stop=check_stop)  # fmt: skip


def peak_rss(process: DaemonProcess) -> int:
    assert process.process is not None
    for line in Path(f"/proc/{process.process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def test_part_body_is_a_seekable_view_of_the_range(tmp_path: Path) -> None:
    import botocore.utils

    path = tmp_path / "data.bin"
    data = os.urandom(3000)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        sent: list[int] = []
        body = PartBody(fd, 1000, 1500, lambda _n: None, sent.append)
        assert botocore.utils.determine_content_length(body) == 1500
        assert body.tell() == 0
        assert body.read(100) == data[1000:1100]
        assert body.read() == data[1100:2500]
        assert body.read(10) == b""
        assert body.seek(-500, os.SEEK_END) == 1000
        assert body.read(1 << 20) == data[2000:2500]
        assert sent == [], "reads before the send are not progress"
        body.seek(0)
        body.is_sending = True
        assert body.read(700) == data[1000:1700]
        assert sent == [700]
        body.seek(0)
        assert not body.is_sending and sent == [700, 0], "a rewind restarts the part's progress"
        assert range_digests(fd, 1000, 1500, md5=True) == (
            hashlib.sha256(data[1000:2500]).digest(), hashlib.md5(data[1000:2500], usedforsecurity=False).hexdigest())
        with pytest.raises(PermanentError, match="shrank"), part_exceptions():
            PartBody(fd, 2900, 200, lambda _n: None, sent.append).read()  # past the end: the file "shrank"
        with pytest.raises(PermanentError):
            range_digests(fd, 2900, 200)
    finally:
        os.close(fd)


def test_daemon_peak_rss_does_not_grow_with_part_size_times_concurrency(
    write_config: Any, spool: Path, daemon: Any, endpoint: str, bucket: str, tmp_path: Path
) -> None:
    """4 parts of 32 MiB, all 4 in flight: whole parts in memory would add 128 MiB to the daemon's peak RSS."""
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          outbox:
            settle: 0s
            retry: {{attempts: 1, delays: [0s]}}
            chain:
              - ship: {{to: 's3://{bucket}/raw/', endpoint_url: '{endpoint}', part_size: 32MiB, concurrency: 4}}
        """)
    process = daemon(config, env=DUMMY_ENV)
    inbox = spool / "outbox" / "inbox"
    # A small file first, so boto3, its service model and a client are loaded before the baseline is taken.
    (tmp_path / "warm.bin").write_bytes(os.urandom(MIB))
    (tmp_path / "warm.bin").rename(inbox / "warm.bin")
    wait_for(sidecar_state(spool, "outbox", "warm.bin", "done"), 60, "the small file shipped")
    baseline = peak_rss(process)
    big = tmp_path / "big.bin"
    sha256 = write_random(big, 128 * MIB)
    big.rename(inbox / "big.bin")
    doc = wait_for(sidecar_state(spool, "outbox", "big.bin", "done"), 120, "the large file shipped")
    growth = peak_rss(process) - baseline
    print(f"daemon peak RSS {baseline / MIB:.0f} MiB after the small file, +{growth / MIB:.0f} MiB for 4 x 32 MiB")
    assert growth < 48 * MIB, f"peak RSS grew by {growth / MIB:.0f} MiB over {baseline / MIB:.0f} MiB for 4 x 32 MiB"
    assert doc["steps"][0]["result"]["verified"] is True
    head = client(endpoint).head_object(Bucket=bucket, Key="raw/big.bin")
    assert head["ETag"].strip('"').endswith("-4")
    assert head["Metadata"]["sha256"] == sha256
    assert object_sha256(endpoint, bucket, "raw/big.bin") == sha256


def test_in_process_peak_allocation_stays_below_one_part(tmp_path: Path, endpoint: str, bucket: str) -> None:
    source = tmp_path / "data.bin"
    sha256 = write_random(source, 64 * MIB + 12345)
    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": endpoint, "part_size": 16 * MIB,
                                                         "concurrency": 4})  # fmt: skip
    try:
        tracemalloc.start()
        try:
            transport.put_file(source, "/in-process.bin", {"sha256": sha256}, context({}))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        transport.close()
    print(f"tracemalloc peak {peak / MIB:.1f} MiB for 4 x 16 MiB parts")
    assert peak < 12 * MIB, f"{peak / MIB:.1f} MiB allocated at the peak: a whole 16 MiB part was held"
    head = client(endpoint).head_object(Bucket=bucket, Key="in-process.bin")
    assert head["ETag"].strip('"') == multipart_etag(source, 16 * MIB)
    assert object_sha256(endpoint, bucket, "in-process.bin") == sha256


def test_a_stopped_upload_resumes_with_only_the_missing_parts(tmp_path: Path, endpoint: str, bucket: str) -> None:
    source = tmp_path / "data.bin"
    sha256 = write_random(source, 8 * 5 * MIB + 7)
    settings = {"endpoint_url": endpoint, "part_size": 5 * MIB, "concurrency": 2}
    checkpoint: dict[str, Any] = {}

    def stop_after_three() -> None:
        if len(checkpoint.get("parts", {})) >= 3:
            raise Interrupted("stopping")

    first = S3Transport(parse_url(f"s3://{bucket}/"), settings)
    with pytest.raises(Interrupted):
        first.put_file(source, "/resumed.bin", {"sha256": sha256}, context(checkpoint, stop_after_three))
    first.close()
    listed = client(endpoint).list_parts(Bucket=bucket, Key="resumed.bin", UploadId=checkpoint["upload_id"])
    on_server = {int(p["PartNumber"]) for p in listed.get("Parts", [])}
    assert 3 <= len(on_server) < 9
    second = S3Transport(parse_url(f"s3://{bucket}/"), settings)
    sent: list[int] = []
    second.client.meta.events.register("provide-client-params.s3.UploadPart",
                                       lambda params, **_: sent.append(int(params["PartNumber"])))  # fmt: skip
    try:
        delivered = second.put_file(source, "/resumed.bin", {"sha256": sha256}, context(checkpoint))
    finally:
        second.close()
    assert delivered.is_verified
    assert not on_server & set(sent), f"parts {sorted(on_server & set(sent))} were on the server and sent again"
    assert sorted(on_server | set(sent)) == list(range(1, 10))
    head = client(endpoint).head_object(Bucket=bucket, Key="resumed.bin")
    assert head["ETag"].strip('"') == multipart_etag(source, 5 * MIB)
    assert object_sha256(endpoint, bucket, "resumed.bin") == sha256


def test_a_part_cut_half_way_is_rewound_and_sent_whole(tmp_path: Path, endpoint: str, bucket: str) -> None:
    import botocore.exceptions

    source = tmp_path / "data.bin"
    sha256 = write_random(source, 3 * 5 * MIB)
    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": endpoint, "part_size": 5 * MIB,
                                                         "concurrency": 1})  # fmt: skip
    cut: list[int] = []

    def cut_part_two(request: Any, **_: Any) -> None:
        body = request.body
        if isinstance(body, PartBody) and "partNumber=2" in request.url and not cut:
            cut.append(len(body.read(2 * MIB)))  # half the part read, as a send cut off half-way
            raise botocore.exceptions.ConnectionClosedError(endpoint_url=request.url)

    transport.client.meta.events.register("before-send.s3.UploadPart", cut_part_two)
    try:
        transport.put_file(source, "/retried.bin", {"sha256": sha256}, context({}))
    finally:
        transport.close()
    assert cut == [2 * MIB], "the cut did not happen"
    head = client(endpoint).head_object(Bucket=bucket, Key="retried.bin")
    assert head["ETag"].strip('"') == multipart_etag(source, 5 * MIB)
    assert object_sha256(endpoint, bucket, "retried.bin") == sha256


class CountingBody(PartBody):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.bytes_read = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.bytes_read += len(data)
        return data


def test_the_payload_hash_is_the_one_botocore_computes_without_a_pass_of_its_own(tmp_path: Path) -> None:
    import botocore.auth
    import botocore.awsrequest
    import botocore.credentials

    path = tmp_path / "data.bin"
    data = os.urandom(3 * MIB + 5)
    path.write_bytes(data)
    credentials = botocore.credentials.Credentials("AKID", "SECRET")
    fd = os.open(path, os.O_RDONLY)
    try:
        for url in ("http://127.0.0.1:9000/b/k?partNumber=1&uploadId=u", "https://s3.amazonaws.com/b/k?partNumber=1"):
            payloads = []
            for signer_class in (botocore.auth.S3SigV4Auth, KnownPayloadAuth):
                body = CountingBody(fd, 0, len(data), lambda _n: None, lambda _n: None, hashlib.sha256(data).digest())
                request = botocore.awsrequest.AWSRequest(method="PUT", url=url, data=body)
                payloads.append((signer_class(credentials, "s3", "us-east-1").payload(request), body.bytes_read))
            (botocore_hash, botocore_read), (known_hash, known_read) = payloads
            assert known_hash == botocore_hash == hashlib.sha256(data).hexdigest()
            assert botocore_read == len(data) and known_read == 0, "the known payload hash took a pass over the body"
        body = PartBody(fd, 0, len(data), lambda _n: None, lambda _n: None, hashlib.sha256(data).digest())
        body.read(10)
        request = botocore.awsrequest.AWSRequest(method="PUT", url="http://h/b/k", data=body)
        partial = KnownPayloadAuth(credentials, "s3", "us-east-1").payload(request)
        assert partial == hashlib.sha256(data[10:]).hexdigest(), "a body not at its start is hashed from where it is"
    finally:
        os.close(fd)


def test_parts_are_signed_with_the_known_payload_and_read_once_for_the_send(
    tmp_path: Path, endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    read_by: dict[int, int] = {}
    unpatched = PartBody.read

    def counting_read(self: PartBody, size: int | None = -1) -> bytes:
        data = unpatched(self, size)
        read_by[id(self)] = read_by.get(id(self), 0) + len(data)
        return data

    monkeypatch.setattr(PartBody, "read", counting_read)
    source = tmp_path / "data.bin"
    sha256 = write_random(source, 2 * 5 * MIB + 99)
    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": endpoint, "part_size": 5 * MIB,
                                                         "concurrency": 2})  # fmt: skip
    signers: list[str] = []
    bodies: list[PartBody] = []

    def record(request: Any, signature_version: str, **_: Any) -> None:
        signers.append(signature_version)
        bodies.append(request.body)

    transport.client.meta.events.register("before-sign.s3.UploadPart", record)
    try:
        transport.put_file(source, "/signed.bin", {"sha256": sha256}, context({}))
    finally:
        transport.close()
    assert signers == ["spoold-s3v4-known-payload"] * 3
    lengths = [body.seek(0, os.SEEK_END) for body in bodies]
    assert sorted(lengths) == [99, 5 * MIB, 5 * MIB]
    assert [read_by[id(body)] for body in bodies] == lengths, "a part was read more than once: sent, not signed"
    assert object_sha256(endpoint, bucket, "signed.bin") == sha256


def test_a_file_that_shrinks_after_the_hashing_fails_permanently_and_aborts(
    tmp_path: Path, endpoint: str, bucket: str
) -> None:
    source = tmp_path / "data.bin"
    sha256 = write_random(source, 3 * 5 * MIB)
    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": endpoint, "part_size": 5 * MIB,
                                                         "concurrency": 1})  # fmt: skip

    def shrink_before_part_three(request: Any, **_: Any) -> None:
        if "partNumber=3" in request.url:
            os.truncate(source, 11 * MIB)  # hashed whole a moment ago; now 4 MiB short of its end

    transport.client.meta.events.register("before-send.s3.UploadPart", shrink_before_part_three)
    checkpoint: dict[str, Any] = {}
    try:
        with pytest.raises(PermanentError, match="shrank"):
            transport.put_file(source, "/shrunk.bin", {"sha256": sha256}, context(checkpoint))
    finally:
        transport.close()
    assert not client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads"), "the upload was left open"
    assert checkpoint == {}, "a permanent failure clears the checkpoint"
