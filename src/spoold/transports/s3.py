"""s3:// — objects in an S3 (or S3-compatible) bucket, with boto3.

URL: `s3://bucket/key` (a key ending in `/` is a prefix). Settings from `ship`:
`endpoint_url`, `region`, `credential`, `part_size`, `concurrency`.

Credentials come from boto3's usual chain or a systemd credential (see
`s3_credentials`); botocore's loggers stay at WARNING (daemon/logs.py) because
its debug output carries signed headers.

A file below `part_size` is one PUT; a larger one is a multipart upload whose
parts go up in parallel, at most `concurrency` in flight. Bodies are streamed
from the file (`s3_parts.PartBody`: botocore reads them in pieces), each part's
SHA-256 from a streaming pass first, so memory does not grow with
`concurrency x part_size`. The upload id and each finished part (number, ETag,
SHA-256) are saved in the step's checkpoint as they finish, so a restarted
daemon asks the server which parts it holds (ListParts) and sends only the rest;
an upload id the server forgot starts afresh, and a permanent failure aborts the
upload so no parts are left billing in the bucket. Every part carries its
SHA-256, checked by the server; the object records the file's sha256 in its
metadata (`x-amz-meta-sha256`) and is verified after completion by size, that
metadata and the server's composite checksum. The object appears only when
complete. A folder becomes one object per file under a prefix.

Downloads (`get_tree`, for `pull` and `fetch`) are in `s3_download` and `s3_ranges`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import botocore.exceptions

from spoold.cache import Cache
from spoold.digest import hash_file
from spoold.errors import ChecksumMismatch, PermanentError, TransientError
from spoold.transports import s3_documents, s3_parts
from spoold.transports.base import Delivered, ParsedUrl, RemoteEntry, TransferContext, Transport, TreeLimits, glob_regex
from spoold.transports.s3_credentials import s3_client
from spoold.transports.s3_download import S3Download
from spoold.transports.s3_errors import b64sha256 as _b64sha
from spoold.transports.s3_errors import error_code as _code
from spoold.transports.s3_errors import http_status as _status
from spoold.transports.s3_errors import mapped as _mapped
from spoold.transports.s3_parts import PartProgress, b64, enable_part_pacing, part_exceptions, range_digests

log = logging.getLogger("spoold.s3")

MAX_PARTS = 10_000
_NO_CHECKSUM_CODES = {"NotImplemented", "InvalidArgument", "InvalidRequest", "XNotImplemented"}


def _matching_etag(source: Path, offset: int, length: int, etag: str) -> str | None:
    """The part's base64 SHA-256 when `etag` (a plain part ETag: the MD5 of its bytes) matches the local range."""
    try:
        fd = os.open(source, os.O_RDONLY)
        try:
            digest, md5 = range_digests(fd, offset, length, md5=True)
        finally:
            os.close(fd)
    except (OSError, PermanentError):
        return None  # the upload that follows meets it again and reports it (a shrunk file: PermanentError)
    return b64(digest) if md5 == etag.strip('"') else None


class S3Transport(Transport):
    def __init__(self, url: ParsedUrl, settings: Mapping[str, Any]) -> None:
        super().__init__(url, settings)
        self.bucket = url.host
        self.part_size = int(settings.get("part_size") or 64 << 20)
        self.concurrency = int(settings.get("concurrency") or 4)
        with _mapped(f"s3://{self.bucket}"):
            self.client: Any = s3_client(settings, self.concurrency + 2)
        enable_part_pacing(self.client)

    def close(self) -> None:
        self.client.close()

    def _key(self, target: str) -> str:
        return target.lstrip("/")

    def put_file(self, source: Path, target: str, digests: Mapping[str, str], ctx: TransferContext) -> Delivered:
        key = self._key(target)
        where = f"s3://{self.bucket}/{key}"
        with _mapped(where, is_local_read=True):
            size = source.stat().st_size
            # The sha256 goes into the object's metadata, which is fixed when the upload starts.
            sha256 = (digests.get("sha256") or ctx.checkpoint.get("sha256")
                      or hash_file(source, ["sha256"])["sha256"])  # fmt: skip
            if size < self.part_size:
                self._put_single(source, key, size, sha256, ctx)
            else:
                self._put_multipart(source, key, size, sha256, ctx)
            self._verify(key, size, sha256, ctx.checkpoint.get("parts"))
        ctx.checkpoint.clear()
        ctx.progress(size, size)
        return Delivered(where, size, is_verified=True)

    def put_tree(self, source: Path, target: str, digests: Mapping[str, Mapping[str, str]],
                 ctx: TransferContext) -> Delivered:  # fmt: skip
        prefix = self._key(target).rstrip("/")
        files = sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink())
        total = sum(p.stat().st_size for p in files)
        finished: list[str] = ctx.checkpoint.setdefault("finished", [])
        done = sum((source / r).stat().st_size for r in finished if (source / r).exists())
        for path in files:
            relative = str(path.relative_to(source))
            if relative in finished:
                continue
            ctx.check_stop()
            base = done
            sub = ctx.sub(lambda n, _t, base=base: ctx.progress(base + n, total),  # type: ignore[misc]
                          ctx.checkpoint.setdefault("files", {}).setdefault(relative, {}))  # fmt: skip
            self.put_file(path, f"{prefix}/{relative}", digests.get(relative, {}), sub)
            finished.append(relative)
            ctx.checkpoint.get("files", {}).pop(relative, None)
            ctx.save_checkpoint()
            done += path.stat().st_size
        return Delivered(f"s3://{self.bucket}/{prefix}/", total, is_verified=True)

    def write_small(self, target: str, data: bytes) -> None:
        key = self._key(target)
        with _mapped(f"s3://{self.bucket}/{key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ChecksumSHA256=_b64sha(data))

    def read_document(self, target: str, limit: int) -> tuple[bytes | None, str | None]:
        return s3_documents.read_document(self.client, self.bucket, self._key(target), limit)

    def write_document(self, target: str, data: bytes, version: str | None) -> str:
        return s3_documents.write_document(self.client, self.bucket, self._key(target), data, version)

    def _put_single(self, source: Path, key: str, size: int, sha256: str, ctx: TransferContext) -> None:
        fd = os.open(source, os.O_RDONLY)
        try:
            # The checksum of the bytes sent, not the file's sha256 from before: a change shows in `_verify`.
            digest = range_digests(fd, 0, size, ctx.check_stop)[0]
            ctx.check_stop()
            body = PartProgress(0, size, ctx.progress, ctx.pace).part_body(1, fd, 0, size, digest)
            with part_exceptions():
                self.client.put_object(Bucket=self.bucket, Key=key, Body=body, ChecksumSHA256=b64(digest),
                                       Metadata={"sha256": sha256})  # fmt: skip
        finally:
            os.close(fd)

    def _put_multipart(self, source: Path, key: str, size: int, sha256: str, ctx: TransferContext) -> None:
        cp = ctx.checkpoint
        part_size = max(self.part_size, -(-size // MAX_PARTS))
        count = -(-size // part_size)
        plan = {"key": key, "size": size, "part_size": part_size, "sha256": sha256}
        if cp.get("upload_id") and any(cp.get(k) != v for k, v in plan.items()):
            # The file or the settings changed since the saved upload: its parts no longer fit.
            self._abort(key, cp["upload_id"])
            cp.clear()
        parts: dict[str, dict[str, Any]] = self._resume(source, key, size, sha256, part_size, count, cp)
        if parts is None:
            # Completed before a crash lost the news: the checkpoint holds some parts or none, so the server's
            # checksum of the parts is checked against the file's own.
            cp["parts"] = s3_parts.file_part_checksums(source, size, part_size, ctx.check_stop)
            return
        try:
            with _mapped(f"s3://{self.bucket}/{key}", is_local_read=True):
                self._send_parts(source, key, size, part_size, count, parts, ctx)
                ctx.check_stop()
                self._complete(key, cp, count)
        except PermanentError:
            self._abort(key, cp["upload_id"])
            cp.clear()
            ctx.save_checkpoint()
            raise

    def _resume(
        self, source: Path, key: str, size: int, sha256: str, part_size: int, count: int, cp: dict[str, Any]
    ) -> Any:  # fmt: skip
        """The parts already on the server for the saved upload, or a new upload; None when already complete."""
        upload_id = cp.get("upload_id")
        if upload_id:
            try:
                on_server = dict(self._list_parts(key, upload_id))
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "NoSuchUpload":
                    raise
                if self._is_complete(key, size, sha256):
                    log.info("s3://%s/%s: upload %s completed before the restart", self.bucket, key, upload_id[:12])
                    return None
                log.info("s3://%s/%s: the server forgot upload %s; starting afresh", self.bucket, key, upload_id[:12])
                cp.clear()
            else:
                saved: dict[str, dict[str, Any]] = cp.get("parts", {})
                parts = {}
                for number, info in on_server.items():
                    expected = min(part_size, size - (number - 1) * part_size)
                    if info["Size"] != expected or number > count:
                        continue
                    checksum = info.get("ChecksumSHA256") or saved.get(str(number), {}).get("sha256")
                    # A part the server finished after a kill lost its reply, on a server that lists no
                    # checksums (moto, some S3-compatible ones): kept when its ETag is the local bytes' MD5.
                    checksum = checksum or _matching_etag(source, (number - 1) * part_size, expected, info["ETag"])
                    if checksum:
                        parts[str(number)] = {"etag": info["ETag"], "sha256": checksum}
                cp["parts"] = parts
                log.info("s3://%s/%s: resuming upload %s: %d of %d parts already on the server", self.bucket, key,
                         upload_id[:12], len(parts), count)  # fmt: skip
                return parts
        # A kill between CreateMultipartUpload and the checkpoint leaves an upload nobody would finish or abort
        # (on AWS, storage billed for ever): the key's open uploads are this item's leftovers.
        for stale in self._open_uploads(key):
            self._abort(key, stale)
        cp.update(key=key, size=size, part_size=part_size, sha256=sha256, parts={})
        cp["upload_id"] = self._create(key, sha256, cp)
        return cp["parts"]

    def _open_uploads(self, key: str) -> list[str]:
        ids, args = [], {"Bucket": self.bucket, "Prefix": key}
        while True:
            page = self.client.list_multipart_uploads(**args)
            ids += [u["UploadId"] for u in page.get("Uploads", []) if u.get("Key") == key]
            if not page.get("IsTruncated"):
                return ids
            args.update(KeyMarker=page.get("NextKeyMarker", ""), UploadIdMarker=page.get("NextUploadIdMarker", ""))

    def _create(self, key: str, sha256: str, cp: dict[str, Any]) -> str:
        try:
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata={"sha256": sha256},
                                                          ChecksumAlgorithm="SHA256")  # fmt: skip
            cp["checksum"] = "SHA256"
        except botocore.exceptions.ClientError as exc:
            if _code(exc) not in _NO_CHECKSUM_CODES:
                raise
            # Some S3-compatible servers refuse additional checksums; Content-MD5 per part still holds.
            created = self.client.create_multipart_upload(Bucket=self.bucket, Key=key, Metadata={"sha256": sha256})
            cp["checksum"] = None
        return str(created["UploadId"])

    def _send_parts(
        self, source: Path, key: str, size: int, part_size: int, count: int, parts: dict[str, dict[str, Any]],
        ctx: TransferContext,
    ) -> None:  # fmt: skip
        cp = ctx.checkpoint
        missing = [n for n in range(1, count + 1) if str(n) not in parts]
        done = sum(min(part_size, size - (int(n) - 1) * part_size) for n in parts)
        ctx.progress(done, size)
        progress = PartProgress(done, size, ctx.progress, ctx.pace)
        if missing:
            log.info("s3://%s/%s: sending %d of %d parts", self.bucket, key, len(missing), count)
        with_checksum = cp.get("checksum") == "SHA256"
        fd = os.open(source, os.O_RDONLY)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="s3-part")
        running: dict[Future[dict[str, Any]], int] = {}
        try:
            queue = iter(missing)
            while True:
                while len(running) < self.concurrency and (number := next(queue, None)) is not None:
                    ctx.check_stop()
                    length = min(part_size, size - (number - 1) * part_size)
                    args = (fd, key, cp["upload_id"], number, (number - 1) * part_size, length, with_checksum,
                            progress, ctx.check_stop)  # fmt: skip
                    running[pool.submit(self._upload_part, *args)] = number
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    number = running.pop(future)
                    parts[str(number)] = future.result()
                    progress.finished(number, parts[str(number)].pop("bytes"))
                    ctx.save_checkpoint()
        except BaseException:
            for future in running:
                future.cancel()
            # Parts already in flight are kept if they finish, so a resume does not resend them.
            for future, number in running.items():
                if not future.cancelled() and future.exception() is None:
                    parts[str(number)] = {k: v for k, v in future.result().items() if k != "bytes"}
            ctx.save_checkpoint()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            os.close(fd)

    def _upload_part(
        self, fd: int, key: str, upload_id: str, number: int, offset: int, length: int, with_checksum: bool,
        progress: PartProgress, check_stop: Callable[[], None],
    ) -> dict[str, Any]:  # fmt: skip
        where = f"s3://{self.bucket}/{key} part {number}"
        try:
            digest = range_digests(fd, offset, length, check_stop)[0]  # streamed: no part is held whole
        except PermanentError as exc:
            raise PermanentError(f"{where}: {exc}") from None
        checksum = b64(digest)
        extra = {"ChecksumSHA256": checksum} if with_checksum else {}
        # Read from the file and paced as it is sent (the caps; a stop is noticed within one socket write, and the
        # part sent again); a file that shrank since the hashing fails it permanently (`ShortRead`).
        with _mapped(where, is_local_read=True), part_exceptions():
            reply = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                            Body=progress.part_body(number, fd, offset, length, digest),
                                            **extra)  # fmt: skip
        return {"etag": reply["ETag"], "sha256": reply.get("ChecksumSHA256") or checksum, "bytes": length}

    def _complete(self, key: str, cp: dict[str, Any], count: int) -> None:
        listed = []
        for number in range(1, count + 1):
            part = cp["parts"][str(number)]
            entry = {"PartNumber": number, "ETag": part["etag"]}
            if cp.get("checksum") == "SHA256":
                entry["ChecksumSHA256"] = part["sha256"]
            listed.append(entry)
        try:
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=cp["upload_id"],
                                                  MultipartUpload={"Parts": listed})  # fmt: skip
        except botocore.exceptions.ClientError as exc:
            # A completion whose reply was lost: the object is there, the upload id gone.
            if _code(exc) != "NoSuchUpload" or not self._is_complete(key, cp["size"], cp["sha256"]):
                raise

    def _list_parts(self, key: str, upload_id: str) -> Iterator[tuple[int, dict[str, Any]]]:
        marker = 0
        for _ in range(MAX_PARTS // 1000 + 1):
            page = self.client.list_parts(Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
            for part in page.get("Parts", []):
                yield int(part["PartNumber"]), part
            if not page.get("IsTruncated"):
                return
            marker = int(page["NextPartNumberMarker"])

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            log.info("s3://%s/%s: aborted upload %s", self.bucket, key, upload_id[:12])
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            log.warning("s3://%s/%s: could not abort upload %s: %s", self.bucket, key, upload_id[:12], exc)

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            head: dict[str, Any] = self.client.head_object(Bucket=self.bucket, Key=key, ChecksumMode="ENABLED")
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 404:
                return None
            raise
        return head

    def _is_complete(self, key: str, size: int, sha256: str) -> bool:
        head = self._head(key)
        return bool(head and head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256)

    def _verify(self, key: str, size: int, sha256: str, parts: Mapping[str, Any] | None) -> None:
        head = self._head(key)
        where = f"s3://{self.bucket}/{key}"
        if head is None:
            raise TransientError(f"{where} is missing right after its upload")
        if head["ContentLength"] != size:
            raise ChecksumMismatch(f"{where} holds {head['ContentLength']} bytes, expected {size}")
        if head.get("Metadata", {}).get("sha256") != sha256:
            raise ChecksumMismatch(f"{where} records a different sha256 than the file sent")
        server = str(head.get("ChecksumSHA256") or "").split("-")[0]
        if server and parts:
            # The server's checksum of a multipart object is the SHA-256 of its parts' SHA-256s.
            joined = b"".join(base64.b64decode(parts[str(n)]["sha256"]) for n in range(1, len(parts) + 1))
            if base64.b64encode(hashlib.sha256(joined).digest()).decode() != server:
                raise ChecksumMismatch(f"{where}: the server's checksum does not match the parts sent")
        elif server and not parts and base64.b64decode(server).hex() != sha256:
            raise ChecksumMismatch(f"{where}: the server's sha256 does not match the file sent")

    def stat(self, target: str) -> RemoteEntry | None:
        key = self._key(target)
        with _mapped(f"s3://{self.bucket}/{key}"):
            if key and not key.endswith("/") and (head := self._head(key)) is not None:
                return RemoteEntry(target, int(head["ContentLength"]), head["LastModified"].timestamp(), False)
            prefix = key.rstrip("/") + "/" if key else ""
            page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
            return RemoteEntry(target, 0, 0.0, True) if page.get("KeyCount", 0) else None

    def glob(self, pattern: str) -> list[RemoteEntry]:
        key_pattern = self._key(pattern)
        literal = re.split(r"[*?\[]", key_pattern, maxsplit=1)[0]
        regex = glob_regex(key_pattern)
        entries = []
        with _mapped(f"s3://{self.bucket}/{literal}"):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=literal):
                entries += [RemoteEntry("/" + o["Key"], o["Size"], o["LastModified"].timestamp(), False)
                            for o in page.get("Contents", []) if regex.fullmatch(o["Key"])]  # fmt: skip
        return entries

    def read_bytes(self, target: str, limit: int = 1 << 20) -> bytes:
        key = self._key(target)
        with _mapped(f"s3://{self.bucket}/{key}"):
            reply = self.client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{limit - 1}")
            data: bytes = reply["Body"].read(limit)
            return data

    def get_tree(self, source: str, target: Path, ctx: TransferContext, *, name: str | None = None,
                 limits: TreeLimits | None = None, cache: Cache | None = None) -> list[Path]:  # fmt: skip
        """An object or a prefix, in parallel ranged GETs, resumable, verified, optionally through `cache`."""
        download = S3Download(self.client, self.bucket, self.part_size, self.concurrency)
        return download.get_tree(source, target, ctx, name=name, limits=limits, cache=cache)
