"""A long mixed load with the daemon's RSS, open file descriptors and threads sampled: all must stay flat.

Small and medium files go through checksum -> exec (exits 75, "try again later", one time in five) ->
manifest -> ship to file:// and to SFTP (a real sshd on loopback); bundles (folders with a `.ready`
marker) go to file://. After a warm-up of WARMUP_S the daemon is sampled at once and then every 10 s
while the load runs for 10 minutes (quick: 1 minute).

Flat, precisely: with the samples split in thirds, the largest of the last third is at most the largest
of the first third plus 10 % plus 5 MiB for RSS, plus FD_SLACK descriptors and plus THREAD_SLACK threads.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

from torture.daemon import Daemon, states
from torture.tally import Counts, Row, scan_folder, sha256_bytes, tally, tracebacks_in

MiB = 1 << 20
SAMPLE_S = 10.0
WARMUP_S = 30.0  # the same load, not sampled: every path has run and the allocator's arenas have grown
FD_SLACK, THREAD_SLACK = 8, 4
# Exit 75 ("try again later") when a random byte is below 51: one time in five. sh and od start fast.
FLAKY = ["/bin/sh", "-c", "[ $(od -An -N1 -tu1 /dev/urandom) -ge 51 ] || exit 75"]


def config(work: Path, sshd: object) -> Path:
    from tests.sshd import Sshd

    assert isinstance(sshd, Sshd)
    far, retry = work / "far", {"attempts": 20, "delays": ["0.2s", "0.5s", "1s"]}
    files = [
        {"checksum": {"algorithms": ["sha256"]}},
        {"exec": {"argv": FLAKY, "timeout": "30s"}},
        {"manifest": {}},
        {"ship": {"to": f"file://{far / 'file'}/"}},
        {"ship": {"to": sshd.url(f"{far / 'sftp'}/"), "identity": str(sshd.identity),
                  "known_hosts": str(sshd.known_hosts)}},
    ]  # fmt: skip
    queues = {
        "files": {"settle": "0.2s", "retry": retry, "chain": files},
        "bundles": {"items": "bundles", "settle": "0.2s", "retry": retry,
                    "chain": [{"checksum": {}}, {"ship": {"to": f"file://{far / 'bundles'}/"}}]},
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps({"spool": str(work / "spool"), "queues": queues}))
    return path


def drop_file(spool: Path, name: str, data: bytes) -> None:
    inbox = spool / "files" / "inbox"
    (inbox / f".{name}.tmp").write_bytes(data)
    os.rename(inbox / f".{name}.tmp", inbox / name)


def drop_bundle(spool: Path, name: str, members: dict[str, bytes]) -> None:
    inbox = spool / "bundles" / "inbox"
    for member, data in members.items():
        (inbox / name / member).parent.mkdir(parents=True, exist_ok=True)
        (inbox / name / member).write_bytes(data)
    (inbox / f"{name}.ready").write_text("{}")


def flat(series: list[int], percent: float, slack: int) -> tuple[bool, int, int]:
    """(flat?, max of the first third, max of the last third)."""
    third = max(1, len(series) // 3)
    first, last = max(series[:third]), max(series[-third:])
    return last <= first * (1 + percent / 100) + slack, first, last


def compact(series: list[int], scale: int = 1, points: int = 12) -> str:
    step = max(1, -(-len(series) // points))
    return ",".join(str(round(v / scale)) for v in series[::step])


class Load:
    """What the producer dropped (name -> sha256) and the samples taken while it ran."""

    def __init__(self, spool: Path) -> None:
        self.spool = spool
        self.rng = random.Random(17)  # noqa: S311 - sizes, not secrets
        self.files: dict[str, str] = {}
        self.bundles: dict[str, str] = {}
        self.samples: list[dict[str, int]] = []

    def second(self, tick: int) -> None:
        """One second's drops: a small file, a medium one every 10 s, a bundle every 15 s (a load the daemon
        keeps up with on 2 shared cores: a soak measures leaks, not a backlog)."""
        self.file(f"s{tick:05d}.bin", self.rng.randint(1, 64 << 10))
        if tick % 10 == 0:
            self.file(f"m{tick:05d}.bin", self.rng.randint(2 * MiB, 8 * MiB))
        if tick % 15 == 0:
            members = {f"cam/{i:04d}.png": os.urandom(self.rng.randint(1, 200 << 10)) for i in range(3)}
            members["meta.json"] = json.dumps({"tick": tick}).encode()
            bundle = f"episode_{tick:05d}"
            self.bundles.update({f"{bundle}/{m}": sha256_bytes(d) for m, d in members.items()})
            drop_bundle(self.spool, bundle, members)

    def file(self, name: str, size: int) -> None:
        data = os.urandom(size)
        self.files[name] = sha256_bytes(data)
        drop_file(self.spool, name, data)

    def drain(self, daemon: Daemon, timeout: float, problems: list[str]) -> float:
        """Seconds until every item is done or failed (failed ones are problems)."""
        started = time.monotonic()
        wanted = {"files": len(self.files), "bundles": len({b.split("/")[0] for b in self.bundles})}
        while time.monotonic() - started < timeout and daemon.is_alive:
            finished = {q: [s for s in states(self.spool, q).values() if s in ("done", "failed")] for q in wanted}
            if all(len(finished[q]) >= n for q, n in wanted.items()):
                break
            time.sleep(0.5)
        for queue in wanted:
            if failed := [i for i, s in states(self.spool, queue).items() if s == "failed"]:
                problems.append(f"{queue}: {len(failed)} failed ({', '.join(sorted(failed)[:3])})")
        return time.monotonic() - started

    def figures(self, problems: list[str]) -> list[str]:
        figure = []
        for key, percent, slack, unit, scale in (("rss", 10.0, 5 * MiB, " MiB", MiB), ("fds", 0.0, FD_SLACK, "", 1),
                                                 ("threads", 0.0, THREAD_SLACK, "", 1)):  # fmt: skip
            series = [s[key] for s in self.samples]
            if len(series) < 3:
                problems.append(f"only {len(series)} samples")
                break
            ok, first, last = flat(series, percent, slack)
            figure.append(f"{key}{unit} {compact(series, scale)} (max first/last third "
                          f"{round(first / scale)}/{round(last / scale)})")  # fmt: skip
            if not ok:
                problems.append(f"{key} grew: {round(first / scale)} -> {round(last / scale)}")
        return figure


def run(work: Path, quick: bool) -> list[Row]:
    from tests.sshd import missing_reason, start_sshd

    if reason := missing_reason():
        return [Row("soak", f"skipped: {reason}", Counts())]
    duration = 60.0 if quick else 600.0
    sshd = start_sshd(work / "sshd")
    problems: list[str] = []
    daemon = Daemon(config(work, sshd), work / "spool", work / "daemon.log")
    try:
        daemon.start()
        load = Load(daemon.spool)
        started = time.monotonic()
        next_sample, tick = started + WARMUP_S, 0
        while time.monotonic() - started < WARMUP_S + duration and daemon.is_alive:
            tick += 1
            load.second(tick)
            if time.monotonic() >= next_sample:
                load.samples.append(daemon.sample())
                next_sample += SAMPLE_S
            time.sleep(max(0.0, started + tick - time.monotonic()))
        drained = load.drain(daemon, 300, problems)
        far = work / "far"
        counts = tally(load.files, scan_folder(far / "file"))
        counts += tally(load.files, scan_folder(far / "sftp"))
        counts += tally(load.bundles, scan_folder(far / "bundles", recursive=True))
        alive = daemon.is_alive
    finally:
        daemon.stop()
        sshd.stop()
    figure = [f"{len(load.samples)} samples every {SAMPLE_S:g} s after {WARMUP_S:g} s; drained in {drained:.0f} s",
              *load.figures(problems)]  # fmt: skip
    faults = (f"{duration / 60:g} min mixed load ({len(load.files)} files x file:// + SFTP, {len(load.bundles)} "
              "bundle files; items are copies), exec exits 75 one time in 5")
    return [Row("soak", faults, counts, tracebacks_in(daemon.log_path), alive, "; ".join(figure), problems)]
