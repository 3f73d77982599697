"""The one exception tree of spoold.

Transports and handlers map library errors (paramiko, botocore, socket, OSError)
onto these classes at their boundary, so the retry policy looks only at spoold's
own classes.
"""

from __future__ import annotations


class SpooldError(Exception):
    """Raised for any failure spoold itself understands."""


class ConfigError(SpooldError):
    """Raised when a configuration file is malformed or invalid.

    `location` names the file, the YAML path and the line, so the CLI prints one
    line an operator can act on.
    """

    def __init__(self, message: str, *, file: str = "", path: str = "", line: int | None = None) -> None:
        self.message = message
        self.file = file
        self.path = path
        self.line = line
        super().__init__(self.describe())

    def describe(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        if self.path:
            where += f": {self.path}"
        return f"{where}: {self.message}"


class StepError(SpooldError):
    """Raised by a step; says whether trying again later could succeed."""

    retryable = False
    type_name = "error"


class TransientError(StepError):
    """Raised when a step failed for a reason that may pass (network, timeout, 5xx, full disk)."""

    retryable = True
    type_name = "transient"


class PermanentError(StepError):
    """Raised when retrying cannot help (authentication refused, 4xx, invalid input, missing file)."""

    retryable = False
    type_name = "permanent"


class ChecksumMismatch(TransientError):
    """Raised when the copy at the destination does not hash to what was sent."""

    type_name = "checksum_mismatch"


class VersionConflict(TransientError):
    """Raised when a shared document changed since it was read, so a conditional write was refused."""

    type_name = "version_conflict"


class CommandTimedOut(TransientError):
    """Raised when a remote command runs past its time; the connection it ran on is dropped."""

    type_name = "timeout"


class TemplateError(PermanentError):
    """Raised when a `{field}` template names an unknown field or renders to an unsafe path."""

    type_name = "template"


class Interrupted(SpooldError):
    """Raised inside a step when the daemon is stopping; the step's checkpoint is kept."""


class MissingDependency(PermanentError):
    """Raised when a handler or transport needs an optional package that is not installed."""

    type_name = "missing_dependency"


class RemoteMissing(PermanentError):
    """Raised when a remote file, object or prefix to be downloaded does not exist."""
