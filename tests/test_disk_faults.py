"""What `make torture`'s disk case found: a full disk is reported in time, logged plainly, never stalls the loop."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.systemd import Notifier
from tests.conftest import DaemonProcess, sidecar_state, wait_for

WriteConfig = Callable[[str], Path]
Start = Callable[..., DaemonProcess]


def site_with(tmp_path: Path, patch: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(patch)
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)}


def test_status_never_blocks_on_a_notify_socket_nobody_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The main loop sent STATUS= with a blocking sendto: a receiver's queue holds ~10 datagrams, then the
    # whole daemon froze (no claims, no health.json) until someone read.
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(tmp_path / "notify.sock"))
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
        notifier = Notifier()
        started = time.monotonic()
        for index in range(100):
            notifier.status(f"{index} running")
        assert time.monotonic() - started < 1.0
        receiver.recv(4096)
        notifier.status("after a read")  # room again: it goes out
        messages = []
        receiver.setblocking(False)
        while True:
            try:
                messages.append(receiver.recv(4096).decode())
            except BlockingIOError:
                break
        assert "STATUS=after a read" in messages
        notifier.close()
    finally:
        receiver.close()


# The daemon's interpreter: a checksum that meets a full disk.
PATCH_ENOSPC = """\
import errno, os
from spoold.handlers.checksum import Checksum

def run(self, ctx):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

Checksum.run = run
"""


def test_a_full_disk_in_a_step_is_retried_without_a_traceback(tmp_path: Path, write_config: WriteConfig,
                                                              spool: Path, daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            retry: {attempts: 2, delays: [0s, 0.2s]}
            chain: [checksum]
        """)
    process = daemon(config, env=site_with(tmp_path, PATCH_ENOSPC))
    (spool / "q" / "inbox" / "x.bin").write_bytes(b"x")
    failed = wait_for(sidecar_state(spool, "q", "x.bin", "failed"), 15, "x.bin failed after 2 attempts")
    assert failed["attempts"] == 2 and "No space left" in failed["error"]["message"]
    assert "Traceback" not in process.log()


# The daemon's interpreter: free space read from a file the test writes.
PATCH_FREE = """\
import os
from pathlib import Path
from spoold.daemon.layout import SpoolLayout

def free_bytes(self):
    return int(Path(os.environ["SPOOLD_TEST_FREE"]).read_text())

SpoolLayout.free_bytes = free_bytes
"""


def test_low_disk_pauses_intake_within_about_a_second(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                      daemon: Start) -> None:  # fmt: skip
    free = tmp_path / "free"
    free.write_text(str(1 << 40))
    config = write_config("""\
        spool: {spool}
        min_free: 1GiB
        queues:
          q:
            settle: 0s
            chain: [checksum]
        """)
    daemon(config, env={**site_with(tmp_path, PATCH_FREE), "SPOOLD_TEST_FREE": str(free)})

    def disk() -> dict[str, Any]:
        try:
            return dict(json.loads((spool / "health.json").read_text())["disk"])
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def planted_read() -> bool:  # the daemon has read the planted free space (through the patch); intake runs
        state = disk()
        return state.get("intake_paused") is False and any(
            isinstance(v, dict) and v.get("free_bytes") == 1 << 40 for v in state.values())

    wait_for(planted_read, 5, "health.json with the planted free space")
    free.write_text(str(1 << 20))
    started = time.monotonic()
    wait_for(lambda: disk().get("intake_paused") is True, 5, "intake paused")
    assert time.monotonic() - started < 2.5  # was up to 5 s plus the health write


def test_intake_pauses_for_a_read_only_spool_and_for_lack_of_inodes() -> None:
    from spoold.daemon.health import NodeStatus
    from spoold.daemon.layout import MIN_FREE_INODES, DiskState

    assert DiskState(10 << 30, 10_000, is_read_only=False).pause_reason(1 << 30) is None
    assert "below min_free" in (DiskState(1 << 20, 10_000, is_read_only=False).pause_reason(1 << 30) or "")
    assert "inodes" in (DiskState(10 << 30, MIN_FREE_INODES - 1, is_read_only=False).pause_reason(1 << 30) or "")
    assert DiskState(10 << 30, None, is_read_only=False).pause_reason(1 << 30) is None  # no inode table (btrfs)
    reason = DiskState(10 << 30, 10_000, is_read_only=True).pause_reason(1 << 30)
    assert reason is not None and "read-only" in reason
    status = NodeStatus("2026-12-01T00:00:00.000Z", {}, 10 << 30, 1 << 30, True, True, None, Path("/s"), reason)
    assert status.status_line().endswith("disk unusable (the spool's filesystem is read-only), intake paused")
    assert status.health_document()["disk"]["/s"]["paused_because"] == reason
