"""The real daemon as a child process that a case may kill, restart and sample."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """The predicate's first truthy value within `timeout` seconds, else TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Daemon:
    """`spoold run -c CONFIG`; every start appends to one log, so tracebacks of every run are counted."""

    def __init__(self, config: Path, spool: Path, log: Path, env: Mapping[str, str] | None = None,
                 prefix: list[str] | None = None) -> None:  # fmt: skip
        self.config, self.spool, self.log_path = config, spool, log
        self.env = {**os.environ, **(env or {})}
        self.prefix = prefix or []  # e.g. ["faketime", "-f", "+1y"] or ["ip", "netns", "exec", "n1"]
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "spoold", "run", "-c", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            )  # fmt: skip
        self.starts += 1
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            if not self.is_alive:
                raise RuntimeError(f"the daemon exited {self.process and self.process.returncode}: {self.log_tail()}")
            try:
                health = json.loads((self.spool / "health.json").read_text())
            except (OSError, ValueError):
                return False
            return bool(health.get("ready")) and health.get("pid") in (self.pid, self._child_pid())

        poll(ready, timeout, "the daemon to be ready")

    def _child_pid(self) -> int | None:
        """With a prefix (faketime, netns exec) the daemon may be a child of the process started."""
        try:
            children = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def sample(self) -> dict[str, int]:
        """RSS bytes, open file descriptors and threads of the daemon process."""
        pid = self._child_pid() if self.prefix else self.pid
        pid = pid or self.pid
        status = Path(f"/proc/{pid}/status").read_text()
        values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        return {
            "rss": int(values["VmRSS"].split()[0]) * 1024,
            "threads": int(values["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
        }


def sidecars(spool: Path, queue: str) -> Iterator[dict[str, Any]]:
    folder = spool / queue / "status"
    if not folder.exists():
        return
    for path in folder.glob("*.json"):
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # replaced between listing and reading: the next poll sees it


def states(spool: Path, queue: str) -> dict[str, str]:
    return {doc["item"]: doc["state"] for doc in sidecars(spool, queue) if isinstance(doc, dict) and "item" in doc}


def all_finished(spool: Path, queues: list[str], count: int) -> bool:
    """True once `count` items of these queues' sidecars say done or failed in total (the last queue's)."""
    finished = sum(1 for q in queues[-1:] for s in states(spool, q).values() if s in ("done", "failed"))
    return finished >= count
