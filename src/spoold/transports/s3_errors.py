"""botocore's errors mapped onto spoold's classes, at the boundary, for every s3:// module.

Transient: throttling, timeouts, 5xx, 408/429, network failures; `ChecksumMismatch` when the server
says a body did not match its checksum; everything else from the server (4xx, refused credentials,
bad parameters) is permanent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator

import botocore.exceptions

from spoold.errors import ChecksumMismatch, Interrupted, PermanentError, TransientError

TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
    "RequestTimeTooSkewed", "OperationAborted", "RequestLimitExceeded", "TooManyRequests", "BadDigest",
    "XAmzContentSHA256Mismatch", "InvalidDigest",
}  # fmt: skip


def b64sha256(data: bytes) -> str:
    """The base64 SHA-256 that S3's `ChecksumSHA256` takes."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def error_code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def http_status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


@contextlib.contextmanager
def mapped(where: str, is_local_read: bool = False) -> Iterator[None]:
    """botocore and OS errors -> spoold's classes, at the boundary."""
    try:
        yield
    except (TransientError, PermanentError, Interrupted):
        raise
    except botocore.exceptions.ClientError as exc:
        code, status = error_code(exc), http_status(exc)
        message = f"{where}: {code or status} {exc.response.get('Error', {}).get('Message', '')}".strip()
        if code in ("BadDigest", "XAmzContentSHA256Mismatch", "InvalidDigest"):
            raise ChecksumMismatch(message) from None
        if code in TRANSIENT_CODES or status >= 500 or status in (408, 429):
            raise TransientError(message) from None
        raise PermanentError(message) from None
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError,
            botocore.exceptions.ParamValidationError, botocore.exceptions.NoRegionError) as exc:  # fmt: skip
        raise PermanentError(f"{where}: {exc}") from None
    except botocore.exceptions.BotoCoreError as exc:
        raise TransientError(f"{where}: {exc}") from None
    except FileNotFoundError as exc:
        if is_local_read:
            raise PermanentError(f"cannot read {exc.filename}: it does not exist") from None
        raise TransientError(f"{where}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise TransientError(f"{where}: {exc.strerror or exc}") from None
