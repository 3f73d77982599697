"""s3:// shared documents: one object read with its ETag and replaced by a conditional PUT.

A write names the ETag it read (`If-Match`), or `If-None-Match: *` to create the
object, so S3 itself refuses the write when another writer got there first:
`412 Precondition Failed`, or `409 ConditionalRequestConflict` while a
concurrent conditional write to the key is in flight. Both, and a `404` for an
`If-Match` whose object was deleted meanwhile, become `VersionConflict`, which
`publish` answers by reading again. The ETag is opaque here: what matters is
that S3 changes it with the content (a single PUT's ETag is its MD5).
"""

from __future__ import annotations

from typing import Any

import botocore.exceptions

from spoold.errors import PermanentError, VersionConflict
from spoold.transports.s3_errors import b64sha256, error_code, http_status, mapped

# 412: the condition failed; 409: another conditional write to the key raced this one (S3 asks to retry).
CONFLICT_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})


def read_document(client: Any, bucket: str, key: str, limit: int) -> tuple[bytes | None, str | None]:
    """The object's content and ETag, or (None, None) when the key does not exist (a missing bucket is an error)."""
    where = f"s3://{bucket}/{key}"
    with mapped(where):
        try:
            reply = client.get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if error_code(exc) == "NoSuchKey":
                return None, None
            raise
        body = reply["Body"]
        try:
            if int(reply.get("ContentLength") or 0) > limit:
                raise PermanentError(f"{where} is {reply['ContentLength']} bytes, more than the {limit} bytes a "
                                     "shared document may hold")  # fmt: skip
            # One byte past the limit, so a server whose Content-Length understated the body is caught too.
            data: bytes = body.read(limit + 1)
        finally:
            body.close()
        if len(data) > limit:
            raise PermanentError(f"{where} is more than the {limit} bytes a shared document may hold")
        return data, str(reply["ETag"])


def write_document(client: Any, bucket: str, key: str, data: bytes, version: str | None) -> str:
    """PUT `data` if the object still has ETag `version` (None: only if it does not exist); its new ETag."""
    where = f"s3://{bucket}/{key}"
    condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
    with mapped(where):
        try:
            reply = client.put_object(Bucket=bucket, Key=key, Body=data, ContentType="application/json",
                                      ChecksumSHA256=b64sha256(data), **condition)  # fmt: skip
        except botocore.exceptions.ClientError as exc:
            code = error_code(exc)
            if code in CONFLICT_CODES or http_status(exc) == 412 or (version is not None and code == "NoSuchKey"):
                raise VersionConflict(f"{where} changed since it was read ({code or http_status(exc)})") from None
            raise
    return str(reply["ETag"])
