"""A full disk, no inodes left, a read-only remount: intake pauses, nothing short is published, work resumes.

(a) full: the spool and the file:// destination on a 64 MiB tmpfs that also holds
a filler file; items arrive until a drop fails with ENOSPC. health.json and the
systemd STATUS line (a datagram socket standing in for systemd's) must say intake
is paused; once the filler goes, work must resume by itself. (b) inodes: the same
on a tmpfs with few inodes and a folder of empty filler files. (c) read-only: the
spool on a loop-mounted ext4 remounted read-only mid-run, then read-write again.
Every item whose drop succeeded must arrive whole; the daemon must stay up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torture.blockdev import loop_mount, make_image, tmpfs, why_not
from torture.blockdev import run as sh
from torture.daemon import Daemon, poll, states
from torture.tally import Counts, Row, scan_folder, sha256_bytes, tally, tracebacks_in

MIN_FREE = 8 << 20
CONFIG = """\
spool: {root}/spool
rescan: 1s
min_free: {min_free}
queues:
  q:
    settle: 0s
    concurrency: 2
    retry: {{attempts: 200, delays: [0s, 1s]}}
    chain:
      - checksum: {{algorithms: [sha256]}}
      - manifest: {{}}
      - ship: {{to: 'file://{root}/dest/'}}
"""


class Notify:
    """An AF_UNIX datagram socket standing in for systemd's, read all the time; remembers every STATUS= line."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.statuses: list[str] = []
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, name="notify", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while not self.closed.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.statuses += [line[7:] for line in data.decode(errors="replace").split("\n")
                              if line.startswith("STATUS=")]  # fmt: skip

    def drain(self) -> list[str]:
        return self.statuses

    def close(self) -> None:
        self.closed.set()
        self.reader.join(timeout=5)
        self.sock.close()


def drop(inbox: Path, name: str, data: bytes) -> bool:
    """A producer's drop (hidden temp name, then rename); False when the disk refused it."""
    tmp = inbox / f".{name}.tmp"
    try:
        tmp.write_bytes(data)
        os.rename(tmp, inbox / name)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False
    return True


def health(spool: Path) -> dict[str, Any]:
    try:
        doc = json.loads((spool / "health.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def is_paused(spool: Path) -> bool:
    return bool(health(spool).get("disk", {}).get("intake_paused"))


def arrived(root: Path, dropped: dict[str, str]) -> bool:
    done = states(root / "spool", "q")
    return all(done.get(name) in ("done", "failed") for name in dropped) and all(
        (root / "dest" / name).exists() or done.get(name) == "failed" for name in dropped)  # fmt: skip


def verdict(case: str, faults: str, root: Path, daemon: Daemon, dropped: dict[str, str], problems: list[str],
            figure: str) -> Row:  # fmt: skip
    try:
        poll(lambda: arrived(root, dropped), 180, "every dropped item to arrive", 0.2)
    except TimeoutError as exc:
        problems.append(str(exc))
    alive = daemon.is_alive
    failed = [n for n, s in states(root / "spool", "q").items() if s == "failed"]
    problems += [f"item {n} failed" for n in failed]
    delivered = scan_folder(root / "dest")
    counts = tally(dropped, delivered)
    counts.duplicated += sum(1 for n in delivered.copies if n not in dropped and not n.endswith(".manifest.json"))
    for name in delivered.copies:
        if name.endswith(".manifest.json"):
            try:
                json.loads((root / "dest" / name).read_bytes())
            except ValueError:
                counts.corrupt += 1
    return Row(case, faults, counts, tracebacks=tracebacks_in(daemon.log_path), daemon_alive=alive, figure=figure,
               problems=problems)  # fmt: skip


def started(work: Path, root: Path, tag: str, notify: Notify | None = None) -> Daemon:
    (root / "dest").mkdir(exist_ok=True)
    config = work / f"{tag}.yaml"
    config.write_text(CONFIG.format(root=root, min_free=MIN_FREE))
    env = {"NOTIFY_SOCKET": str(work / f"{tag}.sock")} if notify else {}
    return Daemon(config, root / "spool", work / f"{tag}.log", env=env).start(timeout=60)


@dataclasses.dataclass
class Filling:
    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    refused: int = 0
    low_at: float | None = None  # when free space (or inodes) first fell below the floor
    paused_at: float | None = None  # when health.json first said intake paused after that
    status_at: float | None = None  # when a STATUS= line first said so


def fill(root: Path, notify: Notify, tag: str, size: int, pace: float, rng: random.Random) -> Filling:
    """Drop items every `pace` seconds until the disk refused five drops (at most a minute)."""
    got, inbox = Filling(), root / "spool" / "q" / "inbox"
    deadline = time.monotonic() + 60
    for index in range(1_000_000):
        if got.refused >= 5 or time.monotonic() > deadline:
            break
        data = rng.randbytes(size)
        if drop(inbox, name := f"{tag}{index:05d}.bin", data):
            got.dropped[name] = sha256_bytes(data)
        else:
            got.refused += 1
            time.sleep(0.3)
        st, now = os.statvfs(root), time.monotonic()
        if got.low_at is None and (st.f_bavail * st.f_frsize < MIN_FREE or st.f_favail < 64 or got.refused):
            got.low_at = now
        if got.low_at is not None and got.paused_at is None and is_paused(root / "spool"):
            got.paused_at = now
        if got.low_at is not None and got.status_at is None and any("paused" in s for s in notify.drain()):
            got.status_at = now
        time.sleep(pace)
    return got


def fill_and_free(work: Path, tag: str, options: str, make_filler: Callable[[Path], None],
                  free_filler: Callable[[Path], None], size: int, pace: float, must_pause: bool,
                  rng: random.Random, *, health_can_lag: bool = False) -> Row:  # fmt: skip
    """(a) and (b): drop until the disk refuses, check the pause is reported, free the filler, all arrive.

    `health_can_lag`: health.json's atomic replace needs a free inode, which a fast producer may take
    between the daemon's checks, so out of inodes only the STATUS= line is sure to say it.
    """
    problems: list[str] = []
    with tmpfs(work / tag, options) as root:
        make_filler(root)
        notify = Notify(work / f"{tag}.sock")
        daemon = started(work, root, tag, notify)
        try:
            got = fill(root, notify, tag, size, pace, rng)
            low_at = got.low_at or time.monotonic()
            if must_pause and got.status_at is None:
                with contextlib.suppress(TimeoutError):  # health.json cannot say it once the disk is full
                    poll(lambda: any("paused" in s for s in notify.drain()), 10, "STATUS= to say paused", 0.1)
                    got.status_at = time.monotonic()
            if must_pause and (got.status_at is None or (got.paused_at is None and not health_can_lag)):
                problems.append(f"intake paused not reported (health.json: {got.paused_at is not None}, "
                                f"STATUS=: {got.status_at is not None})")  # fmt: skip
            time.sleep(3)  # the daemon lives on a full disk for a while
            if not daemon.is_alive:
                problems.append("the daemon died on the full disk")
            free_filler(root)
            freed_at = time.monotonic()
            try:
                poll(lambda: not is_paused(root / "spool"), 20, "health.json to say intake resumed", 0.1)
            except TimeoutError as exc:
                problems.append(str(exc))
            resumed_in = time.monotonic() - freed_at
            row = verdict(tag, f"{tag} (tmpfs {options})", root, daemon, got.dropped, problems, "")
            done_in = time.monotonic() - freed_at
            if got.paused_at:
                paused = (f"paused in {got.paused_at - low_at:.1f} s (STATUS {(got.status_at or low_at) - low_at:.1f}"
                          f" s), resumed in {resumed_in:.1f} s")  # fmt: skip
            else:
                paused = "paused (STATUS)" if got.status_at else "not paused, work retried"
            row.figure = (f"{len(got.dropped)} dropped, {got.refused} refused; {paused}; all done {done_in:.1f} s "
                          "after space returned")  # fmt: skip
            return row
        finally:
            daemon.stop()
            notify.close()


def _fill_bytes(root: Path) -> None:
    (root / "filler").write_bytes(b"\0" * (24 << 20))


def _free_bytes(root: Path) -> None:
    (root / "filler").unlink()


def _fill_inodes(root: Path) -> None:
    (root / "filler").mkdir()
    for i in range(300):
        (root / "filler" / str(i)).touch()


def _free_inodes(root: Path) -> None:
    for path in (root / "filler").iterdir():
        path.unlink()


def read_only(work: Path, rng: random.Random) -> Row:
    """(c): remount the spool's ext4 read-only mid-run for a few seconds, then read-write."""
    problems: list[str] = []
    faults = "read-only remount (loop ext4)"
    make_image(work / "ro.img", 128)
    with loop_mount(work / "ro.img", work / "ro") as _device:
        root = work / "ro"
        notify = Notify(work / "ro.sock")
        daemon = started(work, root, "ro", notify)
        dropped: dict[str, str] = {}
        stop = threading.Event()

        def produce() -> None:
            for index in range(100_000):
                if stop.is_set():
                    return
                data = rng.randbytes(rng.randint(1_000, 600_000))
                if drop(root / "spool" / "q" / "inbox", name := f"ro{index:05d}.bin", data):
                    dropped[name] = sha256_bytes(data)
                time.sleep(0.03)

        producer = threading.Thread(target=produce, daemon=True)
        try:
            producer.start()
            time.sleep(2)
            tries = 0
            while sh("mount", "-o", "remount,ro", str(root), check=False).returncode != 0 and tries < 100:
                tries += 1  # busy: a file is open for writing right now
                time.sleep(0.05)
            if tries >= 100:
                problems.append("could not remount read-only (always busy)")
            # health.json cannot be rewritten on a read-only filesystem: the STATUS line must say it.
            try:
                poll(lambda: any("read-only" in s for s in notify.drain()), 10, "STATUS= to say read-only", 0.1)
            except TimeoutError as exc:
                problems.append(str(exc))
            time.sleep(3)
            if not daemon.is_alive:
                problems.append("the daemon died on the read-only filesystem")
            sh("mount", "-o", "remount,rw", str(root))
            rw_at = time.monotonic()
            time.sleep(2)
            stop.set()
            producer.join(timeout=30)
            row = verdict("ro", faults, root, daemon, dict(dropped), problems, "")
            row.figure = (f"{len(dropped)} dropped, read-only 3 s, paused (STATUS); all done "
                          f"{time.monotonic() - rw_at:.1f} s after rw")  # fmt: skip
            return row
        finally:
            stop.set()
            daemon.stop()
            notify.close()


def run(work: Path, quick: bool) -> list[Row]:
    if reason := why_not():
        return [Row("disk", "full, inodes, read-only", Counts(), figure=f"cannot run here: {reason}")]
    seed = int(os.environ.get("SPOOLD_TORTURE_SEED", str(int(time.time()))))
    rng = random.Random(seed)  # noqa: S311 - a replayable fault schedule, not a secret
    rows = [
        fill_and_free(work, "full", "size=64m", _fill_bytes, _free_bytes, 256 << 10, 0.1, True, rng),
        fill_and_free(work, "inodes", "size=256m,nr_inodes=400", _fill_inodes, _free_inodes, 4096, 0.02, True, rng,
                      health_can_lag=True),
        read_only(work, rng),
    ]
    for row in rows:
        row.case = f"disk/{row.case}"
        if not row.is_clean:
            row.problems.insert(0, f"seed {seed}")
    return rows
