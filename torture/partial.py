"""Case "partial": a corrupted far-side `.part` temp file must be caught on resume and the data sent again.

A capped ship (`rate: 4MiB/s`) of an 8 MiB file is stopped mid-way, to SFTP (a real sshd; the daemon is
SIGKILLed or SIGTERMed, alternately) and to file:// (SIGTERM: a file:// copy checkpoints its offset on a stop,
and a kill starts it over). Then one byte of the kept `.part` prefix is flipped on disk, the daemon restarts,
and the delivered file must be intact. The figure: runs whose corruption was detected before anything was
published (the final file intact, in the ship step's first attempt, so caught by the prefix check on resume and
not by the final verification; for SFTP the daemon's log also says the partial did not match) out of all runs.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

from torture.daemon import Daemon, poll, states
from torture.tally import Counts, Delivered, Row, scan_folder, sha256_bytes, tally, tracebacks_in

MiB = 1 << 20
SIZE = 8 * MiB
RATE = "4MiB/s"
SEED = int(os.environ.get("SPOOLD_TORTURE_SEED", "20261201"))
DETECTED_SFTP = "does not match the local file"


def _drop(inbox: Path, name: str, data: bytes) -> None:
    temp = inbox / f".{name}.tmp"
    temp.write_bytes(data)
    os.rename(temp, inbox / name)


def _stable_size(path: Path, timeout: float = 10.0) -> int:
    """The size of `path` once it stopped growing for 0.3 s (a killed client's last writes may still land)."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        size = path.stat().st_size if path.exists() else -1
        if size != last:
            last, since = size, time.monotonic()
        elif time.monotonic() - since >= 0.3:
            return size
        time.sleep(0.05)
    return last


def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as stream:
        stream.seek(offset)
        byte = stream.read(1)
        stream.seek(offset)
        stream.write(bytes([byte[0] ^ 0xFF]))
        stream.flush()
        os.fsync(stream.fileno())


def _config(work: Path, spool: Path, sftp_to: str, identity: str, known_hosts: str, file_dest: Path) -> Path:
    sftp = {"to": sftp_to, "identity": identity, "known_hosts": known_hosts, "rate": RATE}
    config = {
        "spool": str(spool),
        "rescan": "1s",
        "queues": {
            "sftp": {"settle": "0s", "retry": {"attempts": 5, "delays": ["0s", "1s"]},
                     "chain": [{"checksum": {"algorithms": ["sha256"]}}, {"ship": sftp}]},
            "file": {"settle": "0s", "retry": {"attempts": 5, "delays": ["0s", "1s"]},
                     "chain": [{"checksum": {"algorithms": ["sha256"]}},
                               {"ship": {"to": f"file://{file_dest}/", "rate": RATE}}]},
        },
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps(config))
    return path


def _one_run(daemon: Daemon, queue: str, dest: Path, name: str, data: bytes, rng: random.Random,
             kill: bool) -> tuple[bool, str]:  # fmt: skip
    """Drop, interrupt mid-way, flip a byte of the kept prefix, restart, wait. (flipped and caught?, what happened)"""
    spool = daemon.spool
    part = dest / f".{name}.spoold.part"
    _drop(spool / queue / "inbox", name, data)
    poll(lambda: part.exists() and part.stat().st_size >= 2 * MiB, 60, f"{queue}: {part.name} to pass 2 MiB")
    if kill:
        daemon.kill()
    else:
        daemon.stop()
    size = _stable_size(part)
    if queue == "file":  # a file:// copy keeps only what its checkpoint says
        transfers = _ship_step(spool, queue, name).get("checkpoint", {}).get("transfer", {})
        size = min(size, max((int(t.get("offset") or 0) for t in transfers.values()), default=0))
    flipped = size > 1
    if flipped:
        _flip(part, rng.randrange(0, size - 1))
    daemon.start()
    poll(lambda: states(spool, queue).get(name) in ("done", "failed"), 90, f"{queue}: {name} finished")
    step = _ship_step(spool, queue, name)
    caught = step.get("state") == "done" and step.get("attempt") == 1
    return flipped and caught, f"{'SIGKILL' if kill else 'SIGTERM'} at {size / MiB:.1f} MiB, ship {step.get('state')}"


def _ship_step(spool: Path, queue: str, name: str) -> dict[str, Any]:
    try:
        doc = json.loads((spool / queue / "status" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return next((s for s in doc.get("steps", []) if s.get("name") == "ship"), {})


def run(work: Path, quick: bool) -> list[Row]:
    from tests.sshd import missing_reason, start_sshd

    runs = 3 if quick else 10
    rng = random.Random(SEED)  # noqa: S311 - a replayable run, not a secret
    if reason := missing_reason():
        return [Row("partial", "corrupted remote .part", Counts(), figure=f"skipped: {reason}")]
    sshd = start_sshd(work / "sshd")
    spool, sftp_dest, file_dest = work / "spool", work / "sftp-dest", work / "file-dest"
    sftp_dest.mkdir()
    file_dest.mkdir()
    config = _config(work, spool, sshd.url(f"{sftp_dest}/"), str(sshd.identity), str(sshd.known_hosts), file_dest)
    daemon = Daemon(config, spool, work / "daemon.log")
    rows: list[Row] = []
    try:
        daemon.start()
        for queue, dest in (("sftp", sftp_dest), ("file", file_dest)):
            expected: dict[str, str] = {}
            flipped = 0
            problems: list[str] = []
            log_before = daemon.log_path.read_text(errors="replace").count(DETECTED_SFTP)
            for index in range(runs):
                name = f"{queue}-{index:02d}.bin"
                data = rng.randbytes(SIZE)
                expected[name] = sha256_bytes(data)
                kill = queue == "sftp" and index % 2 == 0
                was_flipped, what = _one_run(daemon, queue, dest, name, data, rng, kill)
                flipped += was_flipped
                if not was_flipped:
                    problems.append(f"{name}: not caught before sending ({what})")
            delivered: Delivered = scan_folder(dest)
            counts = tally(expected, delivered)
            intact = sum(1 for n, s in expected.items() if delivered.copies.get(n) == [s])
            if queue == "sftp":
                said = daemon.log_path.read_text(errors="replace").count(DETECTED_SFTP) - log_before
                if said < flipped:
                    problems.append(f"the log reported {said} mismatched partials of {flipped}")
                detected = min(intact, flipped, said)
            else:
                detected = min(intact, flipped)
            rows.append(Row(
                "partial", f"{runs} flipped bytes in a {queue} .part", counts,
                figure=f"detected {detected}/{runs} ({queue}, stopped at random, {RATE})", problems=problems,
            ))  # fmt: skip
        alive = daemon.is_alive
        for row in rows:
            row.daemon_alive = alive
    finally:
        daemon.stop()
        sshd.stop()
    traces = tracebacks_in(daemon.log_path)
    if rows:
        rows[0].tracebacks = traces
    return rows
