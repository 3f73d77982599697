"""Shared documents: the part of the transport interface that `publish` speaks to.

A shared document (a room manifest, a registry) is read with its version and
written back only if nobody changed it meanwhile: optimistic locking, so
writers on many nodes never lose each other's updates. A version is opaque
text that changes whenever the content does (an S3 ETag, a file's sha256).
`Transport` inherits these defaults, which refuse; `s3://` and `file://`
implement them.
"""

from __future__ import annotations

from spoold.errors import PermanentError

# Beyond this a "document" is some other kind of object, and reading it whole into memory on every update would
# let whoever can write it make every publishing node's memory balloon.
MAX_DOCUMENT_BYTES = 16 << 20


class SharedDocuments:
    """Conditional reads and writes of one small object; the defaults say the scheme cannot do it."""

    def read_document(self, target: str, limit: int) -> tuple[bytes | None, str | None]:
        """`target`'s content and version, or (None, None) when it does not exist; PermanentError past `limit`."""
        raise PermanentError("this destination cannot hold a shared document; use s3:// or file://")

    def write_document(self, target: str, data: bytes, version: str | None) -> str:
        """Replace `target` with `data` if it is still at `version` (None: create it only if it does not exist).

        Returns the new version; raises `VersionConflict` when the condition does not hold.
        """
        raise PermanentError("this destination cannot hold a shared document; use s3:// or file://")
