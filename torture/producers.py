"""Case "producers": slow and odd producers; nothing may be shipped before it is complete (SPEC 3).

Writers, all at once, against a queue with `settle: 1s` and `rescan: 1s` (so scans, which see files no
event announced, keep looking at files still open):
- slow: a file kept open, written in pieces with pauses longer than `settle`, then closed;
- reopen: written and closed, then after a pause longer than `settle` opened again to append. By SPEC 3
  the first close plus `settle` completes the item, so the first version is shipped (under its name) and
  the claim moved it out of the inbox: the reopen creates a new file holding only the appended part, a
  new arrival with the same name. The right count is two deliveries: the first version under the name and
  the second as another copy (the destination's collision name); neither may be a prefix of what was
  written before it was claimed. Both are expected, so neither counts as duplicated;
- dances: written under a temp name (`.x.part`, `x.tmp`, `x~`, slowly) then renamed into place; a
  finished file renamed within the inbox before it settled (only the new name may arrive); a file moved
  in from another folder;
- bundles: the folder made first, its files written slowly, the `.ready` marker written last;
- early marker: a bundle whose marker is written before its last file. By SPEC 3 the marker *is* the
  completion, so the daemon may ship what is there then: a producer's breach, reported in the figure and
  not counted as shipped early.
"Shipped early" (the `corrupt` column) is a delivered copy whose content differs from the final content.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from torture.daemon import Daemon, poll, sidecars
from torture.tally import Delivered, Row, scan_folder, sha256_bytes, tally, tracebacks_in

SETTLE = 1.0
PAUSE = SETTLE * 2.0


def _config(work: Path, spool: Path, dest: Path) -> Path:
    chain = [{"checksum": {"algorithms": ["sha256"]}}, {"ship": {"to": f"file://{dest}/"}}]
    config = {
        "spool": str(spool),
        "rescan": "1s",
        "queues": {
            "files": {"settle": f"{SETTLE:g}s", "concurrency": 4, "chain": chain},
            "bundles": {"items": "bundles", "settle": f"{SETTLE:g}s", "concurrency": 4, "chain": chain},
        },
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps(config))
    return path


def _piece(name: str, i: int) -> bytes:
    return f"{name} piece {i} {'.' * 200}\n".encode()


class Producers:
    def __init__(self, inbox: Path, bundles: Path, staging: Path, pieces: int) -> None:
        self.inbox, self.bundles, self.staging, self.pieces = inbox, bundles, staging, pieces
        self.expected: dict[str, str] = {}  # name at the destination -> final sha256
        self.extra: dict[str, str] = {}  # a reopened file's second version: expected under a collision name
        self.never: set[str] = set()  # names that must not arrive
        self.early_marker: dict[str, str] = {}
        self.bundle_names: list[str] = []
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def _expect(self, name: str, data: bytes) -> None:
        with self.lock:
            self.expected[name] = sha256_bytes(data)

    def slow(self, name: str) -> None:
        data = b""
        with open(self.inbox / name, "wb") as stream:
            for i in range(self.pieces):
                stream.write(_piece(name, i))
                stream.flush()
                data += _piece(name, i)
                time.sleep(PAUSE)
        self._expect(name, data)

    def reopen(self, name: str) -> None:
        first, second = _piece(name, 0), _piece(name, 1)
        (self.inbox / name).write_bytes(first)
        time.sleep(PAUSE * 2)
        with open(self.inbox / name, "ab") as stream:
            stream.write(second)
        self._expect(name, first)
        with self.lock:
            self.extra[name] = sha256_bytes(second)

    def dance(self, name: str, temp: str) -> None:
        data = b""
        with open(self.inbox / temp, "wb") as stream:
            for i in range(self.pieces):
                stream.write(_piece(name, i))
                stream.flush()
                data += _piece(name, i)
                time.sleep(PAUSE)
        os.rename(self.inbox / temp, self.inbox / name)
        self._expect(name, data)

    def rename_inside(self, name: str) -> None:
        data = _piece(name, 0) * 3
        (self.inbox / f"first-{name}").write_bytes(data)
        time.sleep(SETTLE / 4)
        os.rename(self.inbox / f"first-{name}", self.inbox / name)
        with self.lock:
            self.never.add(f"first-{name}")
        self._expect(name, data)

    def move_in(self, name: str) -> None:
        data = b"".join(_piece(name, i) for i in range(self.pieces))
        (self.staging / name).write_bytes(data)
        os.rename(self.staging / name, self.inbox / name)
        self._expect(name, data)

    def bundle(self, name: str, files: int, marker_early: bool) -> None:
        folder = self.bundles / name
        folder.mkdir()
        with self.lock:
            self.bundle_names.append(name)
        final: dict[str, str] = {}
        for i in range(files):
            if marker_early and i == files - 1:
                (self.bundles / f"{name}.ready").write_text("{}")
            data = b"".join(_piece(f"{name}/{i}", j) for j in range(2))
            try:
                with open(folder / f"f{i}.bin", "wb") as stream:
                    stream.write(data[:100])
                    stream.flush()
                    time.sleep(PAUSE if not marker_early else SETTLE / 2)
                    stream.write(data[100:])
            except FileNotFoundError:
                continue  # the early marker's bundle was claimed: the producer's own fault
            final[f"{name}/f{i}.bin"] = sha256_bytes(data)
        if marker_early:
            self.early_marker.update(final)
            return
        (self.bundles / f"{name}.ready").write_text("{}")
        with self.lock:
            self.expected.update(final)

    def run(self, target: str, *args: object) -> None:
        try:
            getattr(self, target)(*args)
        except Exception as exc:  # noqa: BLE001 - a producer's failure is a problem row, not a crash
            with self.lock:
                self.errors.append(f"{target}{args}: {type(exc).__name__}: {exc}")


def _threads(producers: Producers, quick: bool) -> list[threading.Thread]:
    n = 3 if quick else 10
    jobs: list[tuple[object, ...]] = []
    for i in range(n):
        jobs += [("slow", f"slow-{i}.txt"), ("reopen", f"reopen-{i}.txt"),
                 ("dance", f"part-{i}.txt", f".part-{i}.txt.part"), ("dance", f"tmp-{i}.txt", f"tmp-{i}.txt.tmp"),
                 ("dance", f"tilde-{i}.txt", f"tilde-{i}.txt~"), ("rename_inside", f"renamed-{i}.txt"),
                 ("move_in", f"moved-{i}.txt"), ("bundle", f"bundle-{i}", 4, False)]  # fmt: skip
    jobs.append(("bundle", "early-marker", 4, True))
    return [threading.Thread(target=producers.run, args=job) for job in jobs]


def _shipped_early(delivered: Delivered, producers: Producers) -> tuple[int, int, list[str]]:
    """(copies whose content differs from the final content, reopened second versions found, problems)."""
    early, second_found, problems = 0, 0, []
    finals = {**producers.expected}
    for name, digests in delivered.copies.items():
        base = name
        if name not in finals and name not in producers.early_marker:
            stem, _, ext = name.rpartition(".")
            original = stem.rpartition(".")[0] + "." + ext if stem.rpartition(".")[2].isdigit() else None
            if original in producers.extra and digests == [producers.extra[original]]:
                second_found += 1
                continue
            if name in producers.never or original is None:
                problems.append(f"{name} arrived ({'a name renamed away' if name in producers.never else 'unknown'})")
                continue
            base = original
        if base in finals and any(d != finals[base] for d in digests):
            early += 1
    return early, second_found, problems


def run(work: Path, quick: bool) -> list[Row]:
    spool, dest, staging = work / "spool", work / "dest", work / "staging"
    dest.mkdir()
    staging.mkdir()
    daemon = Daemon(_config(work, spool, dest), spool, work / "daemon.log")
    try:
        daemon.start()
        producers = Producers(spool / "files" / "inbox", spool / "bundles" / "inbox", staging, 3 if quick else 5)
        threads = _threads(producers, quick)
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        wanted = len(producers.expected) + len(producers.extra)
        problems = list(producers.errors)
        try:
            poll(lambda: sum(1 for q in ("files", "bundles") for d in sidecars(spool, q)
                             if d.get("state") in ("done", "failed")) >= len(threads) + len(producers.extra),
                 60.0, "every item to finish", interval=0.5)  # fmt: skip
        except TimeoutError as exc:
            problems.append(str(exc))
        time.sleep(SETTLE * 3)  # anything left in an inbox would have been claimed by now
        elapsed = time.monotonic() - started
        # ship writes a bundle's `.ready` marker after it (ready for another spool's inbox): expected there
        delivered = scan_folder(dest, recursive=True, skip=[f"{name}.ready" for name in producers.bundle_names])
        early, second_found, more = _shipped_early(delivered, producers)
        problems += more
        finals = Delivered({k: v for k, v in delivered.copies.items() if k in producers.expected}, delivered.temps)
        counts = tally(producers.expected, finals)
        counts.corrupt = max(counts.corrupt, early)
        if second_found != len(producers.extra):
            problems.append(f"{second_found} of {len(producers.extra)} reopened files' second versions arrived")
        failed = [d["item"] for q in ("files", "bundles") for d in sidecars(spool, q) if d.get("state") == "failed"]
        if failed:
            problems.append(f"failed items: {', '.join(sorted(failed))}")
        got = sum(1 for k, v in delivered.copies.items() if producers.early_marker.get(k) in v)
        figure = (
            f"{wanted} expected deliveries ({len(producers.extra)} reopened files count twice) in "
            f"{elapsed:.0f} s; early marker: {got} of {len(producers.early_marker)} files shipped whole"
        )
        alive = daemon.is_alive
        daemon.stop()
        return [Row("producers", f"{len(threads)} slow/odd producers, pauses {PAUSE:g} s > settle", counts,
                    tracebacks=tracebacks_in(daemon.log_path), daemon_alive=alive, figure=figure,
                    problems=problems)]  # fmt: skip
    finally:
        daemon.kill()
