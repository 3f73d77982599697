"""Running one command on the far host over an SSH exec channel of an open connection.

Imported only by `spoold.transports.sftp`, which owns the connection: a remote
`exec` step, far-side checksums and remote job polls each open a channel on the
same authenticated connection instead of making a new SSH handshake.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import paramiko

from spoold.errors import CommandTimedOut
from spoold.transports.base import CommandResult

# Output kept per stream: the tail is what matters (errors, `capture_fields`' last line), and a chatty program
# must not fill the memory of a 512 MB board.
OUTPUT_LIMIT_BYTES = 1 << 20
POLL_SECONDS = 0.2


class ExecRefused(Exception):
    """The server does not run commands for this user (an SFTP-only account)."""


def run(
    ssh: paramiko.Transport, command: str, *, timeout: float, check_stop: Callable[[], None] | None = None
) -> CommandResult:
    """Run `command` through the far side's login shell: its exit status and the tails of stdout and stderr.

    Past `timeout` the channel is closed and CommandTimedOut raised (the far process may live on: callers
    that must end it say so in the command). `check_stop` is called between reads, so a daemon stop
    interrupts a long command at once.
    """
    try:
        channel = ssh.open_session(timeout=min(timeout, 60.0))
    except paramiko.ChannelException:
        raise ExecRefused("the server refused to open a session channel") from None
    deadline = time.monotonic() + timeout
    stdout, stderr = bytearray(), bytearray()
    with channel:
        channel.settimeout(POLL_SECONDS)
        channel.exec_command(command)
        is_stdout_open = True
        while True:
            while channel.recv_stderr_ready():
                _keep(stderr, channel.recv_stderr(65536))
            if is_stdout_open:
                try:
                    data = channel.recv(65536)
                except TimeoutError:
                    data = None
                if data == b"":
                    is_stdout_open = False
                elif data:
                    _keep(stdout, data)
            elif channel.status_event.wait(POLL_SECONDS):
                while channel.recv_stderr_ready():
                    _keep(stderr, channel.recv_stderr(65536))
                break
            if time.monotonic() > deadline:
                raise CommandTimedOut(f"the command was still running after {timeout:g}s")
            if check_stop is not None:
                check_stop()
        status = channel.recv_exit_status()
    if status == -1:
        # The channel closed without an exit status: the connection died under the command.
        raise EOFError("the connection closed before the command reported its exit status")
    return CommandResult(status, stdout.decode(errors="replace"), stderr.decode(errors="replace"))


def _keep(buffer: bytearray, data: bytes) -> None:
    buffer += data
    if len(buffer) > OUTPUT_LIMIT_BYTES:
        del buffer[: len(buffer) - OUTPUT_LIMIT_BYTES]
