"""ship to s3:// against moto's S3 server (real HTTP, real boto3), started on a free loopback port.

Set SPOOLD_TEST_S3_ENDPOINT (and AWS_* credentials, optionally SPOOLD_TEST_S3_BUCKET) to run the
same tests against a real S3-compatible endpoint as well.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from spoold.errors import Interrupted
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
MIB = 1 << 20
DUMMY_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
             "AWS_SESSION_TOKEN": "testing"}  # fmt: skip


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    fixed_bucket: str | None = None

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name=self.env.get("AWS_DEFAULT_REGION"))


@pytest.fixture(params=["moto", "external"])
def s3(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    if request.param == "external":
        endpoint = os.environ.get("SPOOLD_TEST_S3_ENDPOINT")
        if not endpoint:
            pytest.skip("SPOOLD_TEST_S3_ENDPOINT is not set (opt-in test against a real S3-compatible endpoint)")
        env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        return S3Server(endpoint, env, os.environ.get("SPOOLD_TEST_S3_BUCKET"))
    endpoint = request.getfixturevalue("moto_s3")
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    return S3Server(endpoint, DUMMY_ENV)


@pytest.fixture
def bucket(s3: S3Server) -> str:
    if s3.fixed_bucket:
        return s3.fixed_bucket
    name = f"spoold-test-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def ship_config(write_config: WriteConfig, s3: S3Server, to: str, extra: str = "", retry: str = "1") -> Path:
    return write_config(f"""\
        spool: {{spool}}
        queues:
          outbox:
            settle: 0s
            retry: {{attempts: {retry}, delays: [0s]}}
            chain:
              - checksum: {{algorithms: [sha256]}}
              - ship: {{to: '{to}', endpoint_url: '{s3.endpoint}', part_size: 5MiB, concurrency: 2{extra}}}
        """)


def drop(spool: Path, name: str, data: bytes, queue: str = "outbox") -> None:
    inbox = spool / queue / "inbox"
    temp = inbox / f".{name}.tmp"
    temp.write_bytes(data)
    temp.rename(inbox / name)


def fetch_object(s3: S3Server, bucket: str, key: str) -> tuple[bytes, dict[str, Any]]:
    reply = s3.client().get_object(Bucket=bucket, Key=key)
    return reply["Body"].read(), reply


def test_small_file_is_one_put(write_config: WriteConfig, spool: Path, daemon: Start, s3: S3Server,
                               bucket: str) -> None:  # fmt: skip
    daemon(ship_config(write_config, s3, f"s3://{bucket}/prefix/{{name}}"), env=s3.env)
    data = os.urandom(100_000)
    drop(spool, "clip.mp4", data)
    doc = wait_for(sidecar_state(spool, "outbox", "clip.mp4", "done"), 30, "shipped")
    body, reply = fetch_object(s3, bucket, "prefix/clip.mp4")
    assert body == data
    assert reply["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "-" not in reply["ETag"], "a small file is one PUT, not a multipart upload"
    assert doc["steps"][1]["result"]["verified"] is True


def test_multipart_upload_with_5mib_parts(write_config: WriteConfig, spool: Path, daemon: Start, s3: S3Server,
                                          bucket: str) -> None:  # fmt: skip
    daemon(ship_config(write_config, s3, f"s3://{bucket}/raw/"), env=s3.env)
    data = os.urandom(12 * MIB + 123)
    drop(spool, "chapter.mp4", data)
    wait_for(sidecar_state(spool, "outbox", "chapter.mp4", "done"), 60, "shipped")
    body, reply = fetch_object(s3, bucket, "raw/chapter.mp4")
    assert body == data
    assert reply["ETag"].strip('"').endswith("-3"), "12 MiB in 5 MiB parts is 3 parts"
    assert not s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads"), "no upload left open"


def test_an_upload_left_open_by_a_kill_is_aborted(write_config: WriteConfig, spool: Path, daemon: Start,
                                                  s3: S3Server, bucket: str) -> None:  # fmt: skip
    """A kill between CreateMultipartUpload and the checkpoint leaves an open upload the sidecar never named."""
    leftover = s3.client().create_multipart_upload(Bucket=bucket, Key="raw/chapter.mp4")["UploadId"]
    other = s3.client().create_multipart_upload(Bucket=bucket, Key="raw/chapter.mp4.other")["UploadId"]
    daemon(ship_config(write_config, s3, f"s3://{bucket}/raw/"), env=s3.env)
    data = os.urandom(11 * MIB)
    drop(spool, "chapter.mp4", data)
    wait_for(sidecar_state(spool, "outbox", "chapter.mp4", "done"), 60, "shipped")
    assert fetch_object(s3, bucket, "raw/chapter.mp4")[0] == data
    still_open = {u["UploadId"] for u in s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert leftover not in still_open, "the upload a kill left open is still open"
    assert other in still_open, "an upload of another key was aborted"


def test_resume_after_sigkill_sends_only_missing_parts(
    write_config: WriteConfig, spool: Path, daemon: Start, s3: S3Server, bucket: str
) -> None:
    config = ship_config(write_config, s3, f"s3://{bucket}/big.bin").read_text().replace("concurrency: 2",
                                                                                       "concurrency: 1")
    config_path = write_config(config)
    first = daemon(config_path, env=s3.env)
    parts_total = 16
    data = os.urandom(parts_total * 5 * MIB)
    drop(spool, "big.bin", data)

    def some_parts_saved() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "outbox", "big.bin")
        if not doc or len(doc["steps"]) < 2:
            return None
        transfer = doc["steps"][1].get("checkpoint", {}).get("transfer", {})
        saved = next(iter(transfer.values()), {})
        return saved if len(saved.get("parts", {})) >= 2 else None

    wait_for(some_parts_saved, 60, "two parts saved in the checkpoint")
    first.kill()
    saved = some_parts_saved()  # what the killed daemon had made durable
    assert saved is not None
    assert len(saved["parts"]) < parts_total, "the upload finished before the kill; the test proves nothing"
    on_server = s3.client().list_parts(Bucket=bucket, Key="big.bin", UploadId=saved["upload_id"])["Parts"]
    assert len(on_server) >= len(saved["parts"])

    second = daemon(config_path, env=s3.env)
    wait_for(sidecar_state(spool, "outbox", "big.bin", "done"), 90, "resumed upload done")
    log = second.log()
    found = re.search(rf"resuming upload {saved['upload_id'][:12]}: (\d+) of {parts_total} parts already", log)
    assert found, log
    # Parts the checkpoint recorded are never sent again; a part that reached the server unrecorded
    # is kept only when the server reports its checksum.
    already = int(found.group(1))
    assert len(saved["parts"]) <= already <= len(on_server)
    assert f"sending {parts_total - already} of {parts_total} parts" in log, log
    body, _ = fetch_object(s3, bucket, "big.bin")
    assert hashlib.sha256(body).digest() == hashlib.sha256(data).digest()


def _transport(s3: S3Server, bucket: str, part_size: int = 5 * MIB) -> Any:
    from spoold.transports.base import parse_url
    from spoold.transports.s3 import S3Transport

    return S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": s3.endpoint, "part_size": part_size,
                                                      "concurrency": 2})  # fmt: skip


def _context(checkpoint: dict[str, Any], stop_after_parts: int | None = None) -> Any:
    from spoold.transports.base import TransferContext

    def check_stop() -> None:
        if stop_after_parts is not None and len(checkpoint.get("parts", {})) >= stop_after_parts:
            raise Interrupted("stopping for the test")

    return TransferContext(progress=lambda _done, _total: None, checkpoint=checkpoint,
                           save_checkpoint=lambda: None, check_stop=check_stop)  # fmt: skip


def _count_part_uploads(transport: Any) -> list[int]:
    sent: list[int] = []
    transport.client.meta.events.register("provide-client-params.s3.UploadPart",
                                          lambda params, **_: sent.append(params["PartNumber"]))
    return sent


def test_interrupted_upload_resumes_with_missing_parts_only(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    source = tmp_path / "data.bin"
    data = os.urandom(6 * 5 * MIB + 7)
    source.write_bytes(data)
    checkpoint: dict[str, Any] = {}
    transport = _transport(s3, bucket)
    with pytest.raises(Interrupted):
        transport.put_file(source, "/data.bin", {}, _context(checkpoint, stop_after_parts=3))
    done_before = {int(n) for n in checkpoint["parts"]}
    assert 3 <= len(done_before) < 7
    sent = _count_part_uploads(transport)
    delivered = transport.put_file(source, "/data.bin", {}, _context(checkpoint))
    assert delivered.is_verified
    assert sorted(int(n) for n in sent) == sorted(set(range(1, 8)) - done_before)
    assert fetch_object(s3, bucket, "data.bin")[0] == data
    transport.close()


def test_a_part_whose_reply_was_lost_is_not_sent_again(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    """A kill after the server finished a part but before its reply reached the checkpoint: on resume the
    part is on the server (ListParts) but not in the checkpoint. moto lists no part checksums, so only the
    ETag (the part's MD5) can vouch for it; it must be kept, not sent again (found by `make torture` kills)."""
    source = tmp_path / "data.bin"
    data = os.urandom(4 * 5 * MIB + 7)
    source.write_bytes(data)
    checkpoint: dict[str, Any] = {}
    transport = _transport(s3, bucket)
    with pytest.raises(Interrupted):
        transport.put_file(source, "/data.bin", {}, _context(checkpoint, stop_after_parts=2))
    lost = sorted(checkpoint["parts"], key=int)[0]
    del checkpoint["parts"][lost]  # the reply that the kill lost
    on_server = {int(p["PartNumber"]) for p in s3.client().list_parts(
        Bucket=bucket, Key="data.bin", UploadId=checkpoint["upload_id"])["Parts"]}  # fmt: skip
    assert int(lost) in on_server
    sent = _count_part_uploads(transport)
    assert transport.put_file(source, "/data.bin", {}, _context(checkpoint)).is_verified
    assert int(lost) not in sent, f"part {lost} was on the server and was sent again"
    assert sorted(sent) == sorted(set(range(1, 6)) - on_server)
    assert fetch_object(s3, bucket, "data.bin")[0] == data
    transport.close()


def test_an_upload_completed_before_a_kill_is_verified_against_the_file(
    tmp_path: Path, s3: S3Server, bucket: str
) -> None:
    """A kill after CompleteMultipartUpload but before the checkpoint knew: the upload id is gone and the
    checkpoint holds some of the parts (here one, then none). The item must still end verified, its parts'
    checksums taken from the file (found by `make torture` kills: `KeyError: '1'`, or a checksum mismatch)."""
    source = tmp_path / "data.bin"
    data = os.urandom(3 * 5 * MIB + 7)
    source.write_bytes(data)
    for kept in (["2"], []):
        checkpoint: dict[str, Any] = {}
        transport = _transport(s3, bucket)
        assert transport.put_file(source, "/data.bin", {}, _context(checkpoint)).is_verified
        saved: dict[str, Any] = {}
        probe = _context(saved, stop_after_parts=4)  # every part sent, stopped just before the completion
        with pytest.raises(Interrupted):
            transport.put_file(source, "/again.bin", {}, probe)
        upload_id = saved["upload_id"]
        parts = saved["parts"]
        s3.client().complete_multipart_upload(Bucket=bucket, Key="again.bin", UploadId=upload_id, MultipartUpload={
            "Parts": [{"PartNumber": int(n), "ETag": parts[n]["etag"], "ChecksumSHA256": parts[n]["sha256"]}
                      for n in sorted(parts, key=int)]})  # fmt: skip
        saved["parts"] = {n: parts[n] for n in kept}
        assert transport.put_file(source, "/again.bin", {}, _context(saved)).is_verified
        assert fetch_object(s3, bucket, "again.bin")[0] == data
        transport.close()


def test_upload_id_unknown_to_the_server_starts_afresh(tmp_path: Path, s3: S3Server, bucket: str) -> None:
    source = tmp_path / "data.bin"
    data = os.urandom(3 * 5 * MIB)
    source.write_bytes(data)
    checkpoint: dict[str, Any] = {}
    transport = _transport(s3, bucket)
    with pytest.raises(Interrupted):
        transport.put_file(source, "/data.bin", {}, _context(checkpoint, stop_after_parts=1))
    old_upload = checkpoint["upload_id"]
    s3.client().abort_multipart_upload(Bucket=bucket, Key="data.bin", UploadId=old_upload)
    sent = _count_part_uploads(transport)
    transport.put_file(source, "/data.bin", {}, _context(checkpoint))
    assert sorted(int(n) for n in sent) == [1, 2, 3], "every part is sent again for the fresh upload"
    assert fetch_object(s3, bucket, "data.bin")[0] == data
    transport.close()


def test_delete_source_only_after_verified_upload(write_config: WriteConfig, spool: Path, daemon: Start,
                                                  s3: S3Server, bucket: str) -> None:  # fmt: skip
    daemon(ship_config(write_config, s3, f"s3://{bucket}/{{name}}", extra=", delete_source: true"), env=s3.env)
    data = os.urandom(6 * MIB)
    drop(spool, "gone.bin", data)
    doc = wait_for(sidecar_state(spool, "outbox", "gone.bin", "done"), 60, "shipped")
    assert doc["steps"][1]["result"]["verified"] is True
    assert not list(spool.glob("outbox/*/gone.bin/gone.bin")), "the local copy is removed"
    assert fetch_object(s3, bucket, "gone.bin")[0] == data


def test_missing_bucket_fails_permanently_and_keeps_the_file(write_config: WriteConfig, spool: Path,
                                                             daemon: Start, s3: S3Server) -> None:  # fmt: skip
    missing = f"spoold-missing-{uuid.uuid4().hex[:12]}"
    config = ship_config(write_config, s3, f"s3://{missing}/{{name}}", extra=", delete_source: true", retry="5")
    daemon(config, env=s3.env)
    for name, size in (("small.bin", 1000), ("large.bin", 6 * MIB)):
        drop(spool, name, os.urandom(size))
        doc = wait_for(sidecar_state(spool, "outbox", name, "failed"), 30, f"{name} failed")
        assert doc["error"]["retryable"] is False
        assert doc["attempts"] == 1, "a missing bucket is not retried"
        assert "NoSuchBucket" in doc["error"]["message"]
        assert list(spool.glob(f"outbox/*/{name}/{name}")), "the local copy is kept"


INI = "[default]\naws_access_key_id = AKIDSPOOLDTEST\naws_secret_access_key = s3cr3t-from-systemd\n"


@pytest.mark.parametrize("text", ["AKIDSPOOLDTEST:s3cr3t-from-systemd\n", INI], ids=["line", "ini"])
def test_credential_from_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3: S3Server,
                                               bucket: str, text: str) -> None:  # fmt: skip
    if s3.fixed_bucket or "SPOOLD_TEST_S3_ENDPOINT" in os.environ:
        pytest.skip("needs a server that accepts any key (moto)")
    from spoold.redact import redact
    from spoold.transports.base import parse_url
    from spoold.transports.s3 import S3Transport

    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "s3key").write_text(text)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    for key in DUMMY_ENV:
        monkeypatch.delenv(key, raising=False)
    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": s3.endpoint, "credential": "s3key",
                                                           "region": "us-east-1"})  # fmt: skip
    transport.write_small("/marker.ready", b"{}")
    assert transport.read_bytes("/marker.ready") == b"{}"
    assert "s3cr3t-from-systemd" not in redact("key s3cr3t-from-systemd leaked")
    transport.close()
