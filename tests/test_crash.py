"""Crash safety: SIGKILL the real daemon at random moments; every item still arrives exactly once.

Chain: incoming (checksum -> manifest -> forward) -> outgoing (ship file://). The
seed is printed on failure; set SPOOLD_CRASH_SEED to replay a run.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, read_sidecar, wait_for

FILES = 30
SEED = int(os.environ.get("SPOOLD_CRASH_SEED", "20261121"))


def drop(inbox: Path, name: str, data: bytes) -> None:
    # Producers write under a hidden name and rename, so no scan sees a half-written file.
    tmp = inbox / f".{name}.tmp"
    tmp.write_bytes(data)
    os.rename(tmp, inbox / name)


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    tmp_path: Path, write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    rng = random.Random(SEED)
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          incoming:
            settle: 0s
            concurrency: 2
            retry: {attempts: 5, delays: [0s, 1s]}
            chain:
              - checksum: {algorithms: [sha256, xxh3_128]}
              - manifest: {}
              - forward: outgoing
          outgoing:
            settle: 0s
            concurrency: 2
            retry: {attempts: 5, delays: [0s, 1s]}
            chain:
              - ship: {to: 'file://{tmp}/dest/'}
        """)
    expected: dict[str, bytes] = {
        f"file{i:02d}.txt": rng.randbytes(rng.randint(50_000, 1_500_000)) for i in range(FILES)
    }
    names = list(expected)
    started = time.monotonic()
    process = daemon(config)
    inbox = spool / "incoming" / "inbox"
    kills = rng.randint(5, 8)
    for round_index in range(kills):
        # Drop the files in bursts between kills, so kills land in every phase of the chain.
        for name in names[round_index * FILES // kills : (round_index + 1) * FILES // kills]:
            drop(inbox, name, expected[name])
        time.sleep(rng.uniform(0.05, 0.5))  # places the kill at a random point; it does not wait for anything
        process.kill()
        is_waiting = rng.random() < 0.5
        process = daemon(config, wait=is_waiting)
        if not is_waiting:
            time.sleep(rng.uniform(0.05, 0.3))  # sometimes die again during recovery (places the kill, no wait)
            process.kill()
            process = daemon(config)

    def all_done() -> bool:
        return all((read_sidecar(spool, q, n) or {}).get("state") == "done" for q in ("incoming", "outgoing")
                   for n in names)  # fmt: skip

    try:
        wait_for(all_done, max(10.0, 80 - (time.monotonic() - started)), "every item done after the kills")
    except AssertionError:
        states = {q: {n: (read_sidecar(spool, q, n) or {}).get("state") for n in names}
                  for q in ("incoming", "outgoing")}  # fmt: skip
        raise AssertionError(f"seed {SEED}: not all done: {states}\n{process.log()[-4000:]}") from None

    dest = tmp_path / "dest"
    shipped = sorted(os.listdir(dest))
    assert shipped == sorted([*names, *(f"{n}.manifest.json" for n in names)]), f"seed {SEED}: {shipped}"
    for name, data in expected.items():
        assert hashlib.sha256((dest / name).read_bytes()).digest() == hashlib.sha256(data).digest(), name
    for queue in ("incoming", "outgoing"):
        assert sorted(p.name for p in (spool / queue / "status").iterdir()) == sorted(f"{n}.json" for n in names)
        assert os.listdir(spool / queue / "inbox") == []
        wait_for(lambda queue=queue: os.listdir(spool / queue / "work") == [], 5, f"{queue}/work/ emptied")
        assert sorted(os.listdir(spool / queue / "done")) == sorted(names)
        assert os.listdir(spool / queue / "failed") == []
    leftovers = [p for p in tmp_path.rglob("*") if ".spoold.part" in p.name or p.name.startswith(".handoff")
                 or (p.name.endswith(".tmp") and p.parent.name == "status")]  # fmt: skip
    assert leftovers == [], f"seed {SEED}: leftovers {leftovers}"
    assert time.monotonic() - started < 90
