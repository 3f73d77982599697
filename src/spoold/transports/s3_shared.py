"""The object store side of a shared queue: its inbox, claims, statuses, done/ and failed/ under one prefix.

Only plain S3 is used: ListObjectsV2, GET, conditional PUT (`If-None-Match: *` to
create a claim, `If-Match` on its ETag to renew or take it over), CopyObject and
DELETE. Store time (the `Date` of a reply and an object's `Last-Modified`) is
returned beside what was read, so leases are judged by one clock, the store's,
whatever the nodes' clocks say. The daemon decides what to do (`daemon/shared`);
this module only speaks to the store and maps its errors.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import botocore.exceptions

from spoold.digest import hash_file
from spoold.errors import PermanentError, RemoteMissing, VersionConflict
from spoold.transports.base import TransferContext, TreeLimits, parse_url
from spoold.transports.s3 import S3Transport
from spoold.transports.s3_documents import read_document, write_document
from spoold.transports.s3_download import S3Download
from spoold.transports.s3_errors import error_code, http_status, mapped

READY_SUFFIX = ".ready"
# A claim or a status is a few hundred bytes; more is not ours.
MAX_CLAIM_BYTES = 64 << 10
MAX_STATUS_BYTES = 4 << 20
# CopyObject copies at most 5 GiB in one request; larger objects go through boto3's managed copy.
MAX_SINGLE_COPY = 5 << 30


class ConditionsIgnored(PermanentError):
    """The store accepted a conditional PUT whose condition did not hold: sharing would be unsafe."""


@dataclasses.dataclass(frozen=True)
class InboxEntry:
    """One item the inbox holds: an object, or a prefix of objects with its `<name>.ready` marker."""

    name: str
    is_bundle: bool
    size: int  # the object's size; for a bundle, the marker's
    has_marker: bool
    etag: str = ""  # the object's, as listed ("" when not known: it is HEADed then)
    modified: float = 0.0  # when the store last wrote the object (a bundle: its marker), by its clock


@dataclasses.dataclass(frozen=True)
class ClaimSeen:
    """A claim as a listing shows it: when the store last wrote it, by the store's clock."""

    name: str
    modified: float
    etag: str


@dataclasses.dataclass(frozen=True)
class Claim:
    document: dict[str, Any]
    etag: str
    modified: float
    store_now: float


def _store_time(reply: Mapping[str, Any]) -> float:
    """The store's clock at the reply (its `Date` header), or this node's when the header is missing."""
    value = reply.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    parsed = email.utils.parsedate_to_datetime(value) if value else None
    return parsed.timestamp() if parsed is not None else time.time()


class ShareStore:
    """One shared queue's prefix in one bucket, through a boto3 client of its own."""

    def __init__(self, bucket: str, prefix: str, settings: Mapping[str, Any]) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.transport = S3Transport(parse_url(f"s3://{bucket}/"), {**settings, "concurrency": 4})
        self.client: Any = self.transport.client

    def close(self) -> None:
        self.transport.close()

    def key(self, area: str, rest: str = "") -> str:
        return f"{self.prefix}{area}/{rest}"

    def where(self, area: str, rest: str = "") -> str:
        return f"s3://{self.bucket}/{self.key(area, rest)}"

    # ---- the probe -----------------------------------------------------------------------------------------

    def probe(self, node: str) -> None:
        """Check that the store refuses conditional PUTs whose condition fails; ConditionsIgnored if not."""
        key = self.key("claims", f".probe-{uuid.uuid4().hex}")
        body = json.dumps({"probe": node}).encode()
        with mapped(f"s3://{self.bucket}/{key}"):
            first = write_document(self.client, self.bucket, key, body, None)
            try:
                for condition in (None, f'"{uuid.uuid4().hex}"'):
                    try:
                        write_document(self.client, self.bucket, key, body, condition)
                    except VersionConflict:
                        continue
                    what = "If-None-Match: *" if condition is None else "If-Match"
                    raise ConditionsIgnored(
                        f"s3://{self.bucket}/{self.prefix}: the store accepted a PUT with {what} whose condition "
                        "did not hold; a shared queue needs conditional writes (If-None-Match, If-Match), "
                        "so it is refused rather than run unsafely")  # fmt: skip
            finally:
                self.client.delete_object(Bucket=self.bucket, Key=key)
        del first

    # ---- listings ------------------------------------------------------------------------------------------

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator[dict[str, Any]]:
        extra = {"Delimiter": delimiter} if delimiter else {}
        paginator = self.client.get_paginator("list_objects_v2")
        yield from paginator.paginate(Bucket=self.bucket, Prefix=prefix, **extra)

    def list_inbox(self) -> list[InboxEntry]:
        """The inbox's items; a prefix without its marker yet is not one."""
        base = self.key("inbox")
        objects: dict[str, tuple[int, str, float]] = {}
        folders: set[str] = set()
        with mapped(self.where("inbox")):
            for page in self._pages(base, "/"):
                for entry in page.get("Contents", []):
                    objects[entry["Key"][len(base):]] = (int(entry.get("Size") or 0), str(entry.get("ETag") or ""),
                                                         entry["LastModified"].timestamp())  # fmt: skip
                for entry in page.get("CommonPrefixes", []):
                    folders.add(entry["Prefix"][len(base):].rstrip("/"))
        # A name starting with "." is a producer's temp name, as in a local inbox.
        found = [InboxEntry(name, True, objects[name + READY_SUFFIX][0], True, modified=objects[name + READY_SUFFIX][2])
                 for name in folders if name + READY_SUFFIX in objects and not name.startswith(".")]  # fmt: skip
        for name, (size, etag, modified) in objects.items():
            marker = name.endswith(READY_SUFFIX) and (name[: -len(READY_SUFFIX)] in folders
                                                      or name[: -len(READY_SUFFIX)] in objects)  # fmt: skip
            if name and not marker and name not in folders and not name.startswith("."):
                found.append(InboxEntry(name, False, size, name + READY_SUFFIX in objects, etag, modified))
        return found

    def list_claims(self) -> tuple[dict[str, ClaimSeen], float]:
        """Every claim by item name, and the store's clock when it answered."""
        base = self.key("claims")
        claims: dict[str, ClaimSeen] = {}
        store_now = time.time()
        with mapped(self.where("claims")):
            for page in self._pages(base, "/"):
                store_now = _store_time(page)
                for entry in page.get("Contents", []):
                    rest = entry["Key"][len(base):]
                    if rest.endswith(".json") and not rest.startswith(".probe-"):
                        name = rest[: -len(".json")]
                        claims[name] = ClaimSeen(name, entry["LastModified"].timestamp(), str(entry["ETag"]))
        return claims, store_now

    def list_names(self, area: str) -> list[str]:
        """The item names under `status/`, `done/` or `failed/` (a status name drops its `.json`)."""
        base = self.key(area)
        names: set[str] = set()
        with mapped(self.where(area)):
            for page in self._pages(base, "/"):
                for entry in page.get("Contents", []):
                    names.add(entry["Key"][len(base):])
                for entry in page.get("CommonPrefixes", []):
                    names.add(entry["Prefix"][len(base):].rstrip("/"))
        if area == "status":
            return sorted(n[: -len(".json")] for n in names if n.endswith(".json"))
        return sorted(n for n in names if not n.endswith(READY_SUFFIX) or n[: -len(READY_SUFFIX)] not in names)

    # ---- claims --------------------------------------------------------------------------------------------

    def read_claim(self, name: str) -> Claim | None:
        key = self.key("claims", f"{name}.json")
        with mapped(f"s3://{self.bucket}/{key}"):
            try:
                reply = self.client.get_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if error_code(exc) == "NoSuchKey" or http_status(exc) == 404:
                    return None
                raise
            try:
                data = reply["Body"].read(MAX_CLAIM_BYTES + 1)
            finally:
                reply["Body"].close()
        try:
            document = json.loads(data) if len(data) <= MAX_CLAIM_BYTES else None
        except ValueError:
            document = None
        return Claim(document if isinstance(document, dict) else {}, str(reply["ETag"]),
                     reply["LastModified"].timestamp(), _store_time(reply))  # fmt: skip

    def write_claim(self, name: str, document: Mapping[str, Any], etag: str | None) -> str | None:
        """Create the claim (etag None) or replace the one at `etag`; its new ETag, or None when another won."""
        data = json.dumps(dict(document), sort_keys=True).encode()
        try:
            return write_document(self.client, self.bucket, self.key("claims", f"{name}.json"), data, etag)
        except VersionConflict:
            return None

    def delete_claim(self, name: str) -> None:
        self.delete(self.key("claims", f"{name}.json"))

    # ---- statuses and markers ------------------------------------------------------------------------------

    def write_status(self, name: str, document: Mapping[str, Any]) -> None:
        key = self.key("status", f"{name}.json")
        with mapped(f"s3://{self.bucket}/{key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=json.dumps(dict(document)).encode(),
                                   ContentType="application/json")  # fmt: skip

    def read_status(self, name: str) -> dict[str, Any] | None:
        data, _ = read_document(self.client, self.bucket, self.key("status", f"{name}.json"), MAX_STATUS_BYTES)
        try:
            document = json.loads(data) if data is not None else None
        except ValueError:
            return None
        return document if isinstance(document, dict) else None

    def read_marker(self, area: str, name: str, limit: int) -> bytes | None:
        """The item's `<name>.ready`; None when it is gone; PermanentError when larger than `limit`."""
        data, _ = read_document(self.client, self.bucket, self.key(area, name + READY_SUFFIX), limit)
        return data

    # ---- items ---------------------------------------------------------------------------------------------

    def download(self, entry: InboxEntry, target: Path, ctx: TransferContext, limits: TreeLimits) -> Path | None:
        """The item's object or prefix into `target/<name>`, resumable, verified; None when it left the inbox."""
        if not entry.is_bundle and entry.etag:
            download = S3Download(self.client, self.bucket, self.transport.part_size, self.transport.concurrency)
            return download.get_listed(self.key("inbox", entry.name), entry.size, entry.etag, target, entry.name, ctx)
        source = self.key("inbox", entry.name + ("/" if entry.is_bundle else ""))
        try:
            [path] = self.transport.get_tree(source, target, ctx, name=entry.name, limits=limits)
        except RemoteMissing:
            return None
        return path

    def _item_keys(self, area: str, name: str) -> list[tuple[str, int]]:
        """Every object of the item `name` under `area` (the object, or the prefix's objects and its marker)."""
        single, folder = self.key(area, name), self.key(area, name + "/")
        keys: list[tuple[str, int]] = []
        with mapped(self.where(area, name)):
            for page in self._pages(single, None):
                for entry in page.get("Contents", []):
                    key = entry["Key"]
                    if key in (single, single + READY_SUFFIX) or key.startswith(folder):
                        keys.append((key, int(entry.get("Size") or 0)))
        return keys

    def move(self, name: str, source: str, target: str, known: list[tuple[str, int]] | None = None, *,
             keep_existing: bool = False) -> int:
        """Copy the item from `source/` to `target/` (same layout), then delete the originals; objects moved.

        `known`: the item's objects (relative to `source/`) and sizes when the caller knows them, which
        saves a listing. Copies first, so a crash in between leaves a whole copy in both places, never in
        neither. `keep_existing`: an object already in `target/` is not copied again (an earlier holder's).
        """
        keys = [(self.key(source, rest), size) for rest, size in known] if known else self._item_keys(source, name)
        base, to = self.key(source), self.key(target)
        for key, size in keys:
            new = to + key[len(base):]
            if keep_existing and self._exists(new):
                continue
            if not self._copy(key, new, size):
                keys = [k for k in keys if k[0] != key]
        for key, _ in keys:
            self.delete(key)
        return len(keys)

    def _exists(self, key: str) -> bool:
        with mapped(f"s3://{self.bucket}/{key}"):
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except botocore.exceptions.ClientError as exc:
                if http_status(exc) == 404:
                    return False
                raise
        return True

    def _copy(self, key: str, new: str, size: int) -> bool:
        """Copy one object; False when it is not there (gone since it was listed)."""
        with mapped(f"s3://{self.bucket}/{new}"):
            copy_source = {"Bucket": self.bucket, "Key": key}
            try:
                if size < MAX_SINGLE_COPY:
                    self.client.copy_object(Bucket=self.bucket, Key=new, CopySource=copy_source)
                else:
                    self.client.copy(copy_source, self.bucket, new)
            except botocore.exceptions.ClientError as exc:
                if http_status(exc) == 404 or error_code(exc) == "NoSuchKey":
                    return False
                raise
        return True

    def remove(self, name: str, area: str) -> int:
        keys = self._item_keys(area, name)
        for key, _ in keys:
            self.delete(key)
        return len(keys)

    def delete(self, key: str) -> None:
        with mapped(f"s3://{self.bucket}/{key}"):
            self.client.delete_object(Bucket=self.bucket, Key=key)

    def put_path(self, path: Path, name: str) -> None:
        """`spoold drop` into the shared inbox: a file as one object; a folder's files, then its marker."""
        if path.is_dir():
            for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink()):
                self._put_file(file, self.key("inbox", f"{name}/{file.relative_to(path).as_posix()}"))
            self._put_bytes(self.key("inbox", name + READY_SUFFIX), b"{}")
        elif path.is_file():
            self._put_file(path, self.key("inbox", name))
        else:
            raise PermanentError(f"{path}: not a regular file or a folder")

    def _put_file(self, path: Path, key: str) -> None:
        digest = hash_file(path, ["sha256"])["sha256"]
        with mapped(f"s3://{self.bucket}/{key}", is_local_read=True):
            self.client.upload_file(str(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": digest}})

    def _put_bytes(self, key: str, data: bytes) -> None:
        with mapped(f"s3://{self.bucket}/{key}"):
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType="application/json")
