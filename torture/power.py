"""Power cuts while the daemon writes sidecars and payloads: every copy of the disk resumes, nothing lost.

The spool and the file:// destination live on an ext4 image (the *inner* one) on a
loop device. A power cut is a copy of what that device holds at one instant: its
backing file lives on a second ext4 (the *outer* one), which is frozen with
`fsfreeze` for the copy, so the loop device's writes stop at one point and the
copy holds exactly the writes the device had completed (nothing the inner ext4
still had in its page cache, no sync of the inner filesystem first). dm-flakey
and dm-log-writes would be the tools of choice but there is no device mapper
here. A copy models the cut where every write completed before it survived, not
a reordering of unflushed writes.

Each copy is then mounted read-write through a new loop device (mount replays
the journal; no fsck), its sidecars must all parse, the daemon runs on it until
every item is done, and the destination is compared with what was dropped. A
drop counts when the producer's write, fsync, rename and fsync of the inbox had
all returned before the freeze began; such an item must arrive. Whatever else
arrived (an item dropped during the cut) must be intact too.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import statistics
import threading
import time
from pathlib import Path

from torture.blockdev import frozen, loop_mount, make_image, why_not
from torture.blockdev import run as sh
from torture.daemon import Daemon, poll, sidecars
from torture.tally import Counts, Delivered, Row, scan_folder, sha256_bytes, tally, tracebacks_in

QUEUES = ("incoming", "outgoing")
NAME = re.compile(r"^(p\d{4})(\.\d+)?\.bin(\.manifest\.json)?$")
CONFIG = """\
spool: {root}/spool
rescan: 1s
queues:
  incoming:
    settle: 0s
    concurrency: 2
    retry: {{attempts: 5, delays: [0s, 1s]}}
    chain:
      - checksum: {{algorithms: [sha256, xxh3_128]}}
      - manifest: {{}}
      - forward: outgoing
  outgoing:
    settle: 0s
    concurrency: 2
    retry: {{attempts: 5, delays: [0s, 1s]}}
    chain:
      - ship: {{to: 'file://{root}/dest/'}}
"""


class Producer(threading.Thread):
    """Drops items as a careful producer does; `durable` lists those whose drop had fully returned."""

    def __init__(self, inbox: Path, payloads: dict[str, bytes], rng: random.Random) -> None:
        super().__init__(name="producer", daemon=True)
        self.inbox, self.payloads, self.rng = inbox, payloads, rng
        self.durable: list[str] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for name, data in self.payloads.items():
                if self.stop.is_set():
                    return
                tmp = self.inbox / f".{name}.tmp"
                with open(tmp, "wb") as stream:
                    stream.write(data)
                    stream.flush()
                    os.fsync(stream.fileno())
                os.rename(tmp, self.inbox / name)
                folder = os.open(self.inbox, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
                self.durable.append(name)
                time.sleep(self.rng.uniform(0.0, 0.08))
        except BaseException as exc:  # noqa: BLE001 - reported by the case
            self.error = exc


def write_config(path: Path, root: Path) -> Path:
    path.write_text(CONFIG.format(root=root))
    return path


def broken_sidecars(spool: Path) -> list[str]:
    """Sidecars (final names, not temp files) that do not parse as a JSON object."""
    bad = []
    for queue in QUEUES:
        folder = spool / queue / "status"
        for path in folder.glob("*.json") if folder.exists() else ():
            if path.name.startswith("."):
                continue
            try:
                doc = json.loads(path.read_bytes())
            except (OSError, ValueError) as exc:
                bad.append(f"{queue}/{path.name}: {exc}")
                continue
            if not isinstance(doc, dict) or "state" not in doc:
                bad.append(f"{queue}/{path.name}: not a sidecar")
    return bad


def settled(spool: Path, root: Path, must: set[str]) -> bool:
    """Every item the copy knows is done in both queues, inboxes empty, every durable item arrived."""
    for queue in QUEUES:
        inbox = spool / queue / "inbox"
        if inbox.exists() and any(not n.startswith(".") for n in os.listdir(inbox)):
            return False
        if any(doc.get("state") not in ("done", "failed") for doc in sidecars(spool, queue)):
            return False
    arrived = set(os.listdir(root / "dest")) if (root / "dest").exists() else set()
    return must <= arrived


def judge(delivered: Delivered, payloads: dict[str, bytes], must: list[str]) -> tuple[Counts, list[str]]:
    """Counts for the durable items, plus: anything else that arrived must be intact and expected."""
    digests = {name: sha256_bytes(data) for name, data in payloads.items()}
    counts = tally({name: digests[name] for name in must}, delivered)
    problems: list[str] = []
    for name, copies in delivered.copies.items():
        match = NAME.match(name)
        if match is None or f"{match[1]}.bin" not in payloads:
            problems.append(f"unexpected file {name!r} at the destination")
            continue
        base = f"{match[1]}.bin"
        if match[2]:
            counts.duplicated += 1  # a second copy under a collision suffix
        if match[3]:
            continue  # manifests are checked for parsing below
        if base not in must and any(c != digests[base] for c in copies):
            counts.corrupt += 1
    return counts, problems


def check_copy(index: int, image: Path, work: Path, payloads: dict[str, bytes], must: list[str],
               quick: bool) -> tuple[Counts, int, list[str], float]:  # fmt: skip
    """Mount one copy, resume the daemon on it; (counts, tracebacks, problems, seconds to all done)."""
    mnt = work / f"copy{index}"
    log = work / f"copy{index}.log"
    problems: list[str] = []
    with loop_mount(image, mnt):
        spool = mnt / "spool"
        problems += [f"copy {index}: sidecar does not parse: {b}" for b in broken_sidecars(spool)]
        daemon = Daemon(write_config(work / f"copy{index}.yaml", mnt), spool, log)
        started = time.monotonic()
        try:
            daemon.start(timeout=60)
            try:
                poll(lambda: settled(spool, mnt, set(must)), 60 if quick else 120, f"copy {index} to finish", 0.2)
            except TimeoutError as exc:
                problems.append(f"copy {index}: {exc}")
            took = time.monotonic() - started
            alive = daemon.is_alive
        finally:
            daemon.stop()
        if not alive:
            problems.append(f"copy {index}: the daemon died: {daemon.log_tail(5)}")
        failed = [d.get("item") for q in QUEUES for d in sidecars(spool, q) if d.get("state") == "failed"]
        problems += [f"copy {index}: item {name} failed" for name in failed]
        delivered = scan_folder(mnt / "dest")
        for name in delivered.copies:
            if name.endswith(".manifest.json"):
                try:
                    json.loads((mnt / "dest" / name).read_bytes())
                except ValueError:
                    problems.append(f"copy {index}: manifest {name} is corrupt")
        counts, more = judge(delivered, payloads, must)
        problems += [f"copy {index}: {p}" for p in more]
    return counts, tracebacks_in(log), problems, took


def cut_while_running(work: Path, payloads: dict[str, bytes], cuts: int, rng: random.Random,
                      problems: list[str]) -> tuple[list[list[str]], int]:  # fmt: skip
    """The main run: items flow while `cuts` copies are taken; (durable names at each cut, tracebacks)."""
    outer, inner, copies = work / "outer", work / "outer" / "inner.img", work / "copies"
    main_log = work / "main.log"
    cut_at: list[list[str]] = []
    make_image(work / "outer.img", 1024)
    with loop_mount(work / "outer.img", outer):
        make_image(inner, 384)
        mnt = work / "mnt"
        with loop_mount(inner, mnt):
            (mnt / "dest").mkdir()
            daemon = Daemon(write_config(work / "main.yaml", mnt), mnt / "spool", main_log)
            producer = Producer(mnt / "spool" / "incoming" / "inbox", payloads, rng)
            main_alive = False
            try:
                daemon.start(timeout=60)
                producer.start()
                span = 0.045 * len(payloads)  # about how long the producer takes
                for index in range(cuts):
                    time.sleep(rng.uniform(0.1, 2 * span / cuts))
                    must = list(producer.durable)  # read before the freeze: each of these is durable
                    with frozen(outer):
                        sh("cp", "--sparse=always", str(inner), str(copies / f"{index}.img"), timeout=300)
                    cut_at.append(must)
                producer.join(timeout=300)
                if producer.error is not None:
                    problems.append(f"the producer failed: {producer.error!r}")
                poll(lambda: settled(mnt / "spool", mnt, set(producer.durable)), 300, "the main run to finish", 0.2)
                main_alive = daemon.is_alive
            finally:
                producer.stop.set()
                daemon.stop()
            if not main_alive:
                problems.append(f"the main daemon died: {daemon.log_tail(5)}")
            main_counts, more = judge(scan_folder(mnt / "dest"), payloads, producer.durable)
            problems += more
            if not main_counts.is_clean:
                problems.append(f"the main run itself was not clean: {main_counts}")
    return cut_at, tracebacks_in(main_log)


def run(work: Path, quick: bool) -> list[Row]:
    cuts = 3 if quick else 20
    faults = f"{cuts} power cuts"
    if reason := why_not():
        return [Row("power", faults, Counts(), figure=f"cannot run here: {reason}")]
    seed = int(os.environ.get("SPOOLD_TORTURE_SEED", str(int(time.time()))))
    rng = random.Random(seed)  # noqa: S311 - a replayable fault schedule, not a secret
    count = 60 if quick else 240
    payloads = {f"p{i:04d}.bin": rng.randbytes(rng.randint(2_000, 400_000)) for i in range(count)}
    copies = work / "copies"
    copies.mkdir()
    problems: list[str] = []
    total, took = Counts(), []
    try:
        cut_at, tracebacks = cut_while_running(work, payloads, cuts, rng, problems)
        for index, must in enumerate(cut_at):
            image = copies / f"{index}.img"
            try:
                counts, found, more, seconds = check_copy(index, image, work, payloads, must, quick)
            except Exception as exc:  # noqa: BLE001 - one broken copy is a problem of the row, the others still run
                problems.append(f"copy {index}: {type(exc).__name__}: {exc}")
                continue
            finally:
                image.unlink(missing_ok=True)
            total += counts
            tracebacks += found
            problems += more
            took.append(seconds)
    finally:
        shutil.rmtree(copies, ignore_errors=True)
    if problems:
        problems.insert(0, f"seed {seed}")
    durable = [len(m) for m in cut_at]
    figure = (
        f"fsfreeze+copy of a loop ext4; {min(durable, default=0)}-{max(durable, default=0)} items durable "
        f"at a cut; all done {statistics.median(took) if took else 0:.1f} s (median) after restart"
    )
    return [Row("power", faults, total, tracebacks=tracebacks, daemon_alive=not any("died" in p for p in problems),
                figure=figure, problems=problems)]  # fmt: skip
