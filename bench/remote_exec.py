"""Remote exec overhead: N short remote commands (`true`) on spoold's reused SSH connection vs `ssh host true` x N.

    python -m bench.remote_exec          # N = 25 (~55 s on 2 cores); SPOOLD_BENCH_N=100 for the 100-command figure

All three run against the same loopback sshd in the same run, interleaved, median of SPOOLD_BENCH_RUNS (>= 3):
- OpenSSH: `ssh -o ControlMaster=no -o ControlPath=none ... true`, N times, a new connection each time;
- spoold transport: one SftpTransport, N x run_command(command_line(["true"], {}, None)); the connection
  is made once and its cost is inside the time;
- spoold daemon: `python -m spoold run` with a queue (`items: requests`) whose one step is
  `exec: {remote: ssh://...}`; N request files dropped at once, timed from the first drop to every sidecar
  `done`. It includes detection, settling and sidecar writes, so it is the whole-daemon figure.
Prints per-command ms, totals and the ratios spoold/OpenSSH (target < 1.0: faster than OpenSSH without reuse).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.sshd import Sshd, missing_reason, start_sshd  # noqa: E402

from spoold.handlers.remote_exec import command_line  # noqa: E402
from spoold.transports.base import parse_url  # noqa: E402
from spoold.transports.sftp import SftpTransport  # noqa: E402

DEADLINE_SECONDS = 300.0
QUEUE = "jobs"


def remote_url(server: Sshd) -> str:
    return f"ssh://{server.user}@127.0.0.1:{server.port}"


def settings(server: Sshd) -> dict[str, object]:
    return {"identity": str(server.identity), "known_hosts": str(server.known_hosts), "connect_timeout": 10}


def run_openssh(server: Sshd, count: int) -> float:
    argv = [
        "ssh", "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={server.known_hosts}",
        "-i", str(server.identity), "-p", str(server.port), f"{server.user}@127.0.0.1", "true",
    ]  # fmt: skip
    start = time.perf_counter()
    for _ in range(count):
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def run_transport(server: Sshd, count: int) -> float:
    line = command_line(["true"], {}, None)
    start = time.perf_counter()
    transport = SftpTransport(parse_url(remote_url(server)), settings(server))
    try:
        for _ in range(count):
            result = transport.run_command(line, timeout=30.0, check_stop=lambda: None)
            if result.status != 0:
                raise RuntimeError(f"remote true exited {result.status}: {result.stderr}")
    finally:
        transport.close()
    return time.perf_counter() - start


class Daemon:
    """One spoold daemon for all daemon runs: its start-up is not what is measured, the commands are."""

    def __init__(self, root: Path, server: Sshd) -> None:
        self.spool = root / "spool"
        config = root / "spoold.yaml"
        step = {"remote": remote_url(server), "argv": ["true"], **settings(server)}
        config.write_text(
            f"spool: {self.spool}\nqueues:\n  {QUEUE}:\n    items: requests\n    settle: 0s\n"
            f"    chain:\n      - exec: {json.dumps(step)}\n"
        )
        self.log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([sys.executable, "-m", "spoold", "run", "-c", str(config)], stdout=self.log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
        self.runs = 0
        _wait(lambda: _json(self.spool / "health.json").get("pid") == self.process.pid
              and bool(_json(self.spool / "health.json").get("ready")), self._alive)  # fmt: skip

    def _alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"spoold exited with {self.process.returncode}: see {self.log.name}")

    def run(self, count: int) -> float:
        self.runs += 1
        names = [f"r{self.runs}_{index:04d}" for index in range(count)]
        inbox = self.spool / QUEUE / "inbox"
        status = self.spool / QUEUE / "status"
        start = time.perf_counter()
        for name in names:
            (inbox / f".{name}.tmp").write_text("{}")
            os.rename(inbox / f".{name}.tmp", inbox / f"{name}.json")
        left = set(names)

        def all_done() -> bool:
            for name in list(left):
                state = _json(status / f"{name}.json").get("state")
                if state == "failed":
                    raise RuntimeError(f"spoold failed {name}: {_json(status / f'{name}.json').get('error')}")
                if state == "done":
                    left.discard(name)
            return not left

        _wait(all_done, self._alive)
        return time.perf_counter() - start

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def _json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _wait(predicate: Callable[[], bool], alive: Callable[[], None]) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not predicate():
        alive()
        if time.monotonic() > deadline:
            raise RuntimeError("benchmark timed out")
        time.sleep(0.005)


def main() -> None:
    reason = missing_reason()
    if reason:
        print(f"skipped: {reason}")
        return
    count = int(os.environ.get("SPOOLD_BENCH_N", "25"))
    runs = max(3, int(os.environ.get("SPOOLD_BENCH_RUNS", "3")))
    times: dict[str, list[float]] = {"openssh": [], "transport": [], "daemon": []}
    with tempfile.TemporaryDirectory(prefix="spoold-bench-") as tmp:
        root = Path(tmp)
        server = start_sshd(root / "sshd")
        daemon: Daemon | None = None
        try:
            daemon = Daemon(root, server)
            daemon.run(min(count, 5))  # the daemon's first connection and imports are start-up, not per-command
            for _ in range(runs):
                # Interleaved, so a noisy neighbour on the shared cores hits all three alike.
                times["openssh"].append(run_openssh(server, count))
                times["transport"].append(run_transport(server, count))
                times["daemon"].append(daemon.run(count))
        finally:
            if daemon is not None:
                daemon.stop()
            server.stop()
    ssh_s = statistics.median(times["openssh"])
    print(f"{count} x `true` on a loopback sshd, median of {runs} interleaved runs, {os.cpu_count()} CPUs")
    labels = {
        "openssh": "OpenSSH `ssh host true`, no ControlMaster",
        "transport": "spoold transport run_command, 1 connection",
        "daemon": "spoold daemon, drop -> all sidecars done",
    }
    for key, label in labels.items():
        total = statistics.median(times[key])
        spread = ", ".join(f"{t:.2f}" for t in times[key])
        print(f"{label:44s}: {total:6.2f} s  {1000 * total / count:6.1f} ms/command  (runs: {spread})")
    for key in ("transport", "daemon"):
        ratio = statistics.median(times[key]) / ssh_s
        print(f"ratio spoold {key}/OpenSSH: {ratio:.2f} (target < 1.0) {'OK' if ratio < 1.0 else 'MISSED'}")


if __name__ == "__main__":
    main()
