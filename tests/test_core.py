"""The loop's core through the real daemon: reloads that drop a queue or change its concurrency while items run,
internal errors contained in a step, and folder operations that fail inside the loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]

# Sleeps 3 s, then records that it ran to the end.
SLOW = """\
import sys, time
from pathlib import Path
tmp, name = Path(sys.argv[1]), sys.argv[2]
(tmp / "started").write_text(name)
time.sleep(3)  # a slow step: not synchronisation
with open(tmp / "ran.log", "a") as log:
    log.write(name + "\\n")
"""

# Shows itself in running/ until `release` exists (30 s at most).
HOLD = """\
import sys, time
from pathlib import Path
tmp, name = Path(sys.argv[1]), sys.argv[2]
mark = tmp / "running" / name
mark.touch()
deadline = time.monotonic() + 30
while not (tmp / "release").exists() and time.monotonic() < deadline:
    time.sleep(0.05)  # a poll's interval, bounded by the deadline: not synchronisation
mark.unlink()
sys.exit(0 if (tmp / "release").exists() else 1)
"""

# Loaded by the daemon's interpreter at start (sitecustomize): a checksum step with a bug.
PATCH_RAISES = """\
from spoold.handlers.checksum import Checksum

def run(self, ctx):
    raise RuntimeError("boom from a test")

Checksum.run = run
"""

PATCH_UNUSABLE_RESULT = """\
from pathlib import Path

from spoold.handlers.base import StepResult
from spoold.handlers.checksum import Checksum

def run(self, ctx):
    return StepResult(outputs=[Path("/nonexistent-outside/x")])

Checksum.run = run
"""


def alive(process: DaemonProcess) -> None:
    assert process.process is not None
    code = process.process.poll()
    if code is not None:
        raise AssertionError(f"the daemon exited with {code}:\n{process.log()[-6000:]}")


def wait_alive(process: DaemonProcess, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    """`wait_for`, failing at once (with the log) if the daemon exits meanwhile."""

    def check() -> Any:
        alive(process)
        return predicate()

    return wait_for(check, timeout, what)


def health_queues(spool: Path) -> set[str] | None:
    try:
        return set(json.loads((spool / "health.json").read_text())["queues"])
    except (FileNotFoundError, ValueError):
        return None


def state_of(spool: Path, queue: str, item: str) -> str | None:
    doc = read_sidecar(spool, queue, item)
    return doc.get("state") if doc else None


def no_crash_in(process: DaemonProcess) -> None:
    assert "Traceback" not in process.log(), process.log()[-6000:]


# ---- reload ---------------------------------------------------------------------------------------------------


def slow_config(tmp_path: Path, with_slow: bool) -> str:
    text = "spool: {spool}\nrescan: 1s\nqueues:\n  other:\n    settle: 0s\n    chain:\n      - checksum: {}\n"
    if with_slow:
        argv = f"['{sys.executable}', '{tmp_path / 'slow.py'}', '{tmp_path}', '{{name}}']"
        text += f"  slow:\n    settle: 0s\n    chain:\n      - exec: {{argv: {argv}, timeout: 60s}}\n"
    return text


def test_reload_drops_a_queue_while_its_item_runs(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                  daemon: Start) -> None:  # fmt: skip
    (tmp_path / "slow.py").write_text(SLOW)
    config = write_config(slow_config(tmp_path, with_slow=True))
    process = daemon(config)
    (spool / "slow" / "inbox" / "clip.bin").write_bytes(b"slow payload")
    wait_alive(process, sidecar_state(spool, "slow", "clip.bin", "running"), 10, "slow item running")
    wait_alive(process, (tmp_path / "started").exists, 10, "the exec started")

    write_config(slow_config(tmp_path, with_slow=False))
    process.signal(signal.SIGHUP)
    # The step is stopped with its queue: its end must not reach a queue that is gone.
    wait_alive(process, lambda: "queue slow: its last running item has stopped" in process.log(), 10,
               "the dropped queue's running item to end")  # fmt: skip
    wait_alive(process, lambda: health_queues(spool) == {"other"}, 12, "health.json without the dropped queue")

    (spool / "other" / "inbox" / "after.txt").write_text("after")
    wait_alive(process, sidecar_state(spool, "other", "after.txt", "done"), 10, "the remaining queue still works")

    # The dropped queue's item stays on disk, whole, with its sidecar.
    assert read_sidecar(spool, "slow", "clip.bin") is not None
    kept = [spool / "slow" / where / "clip.bin" for where in ("work", "done")]
    assert [p for p in kept if (p / "clip.bin").is_file()], f"item data gone: {list((spool / 'slow').rglob('*'))}"
    assert not list((spool / "slow" / "failed").iterdir())
    no_crash_in(process)

    # The queue comes back: its item ends done, its exec having run to the end exactly once.
    write_config(slow_config(tmp_path, with_slow=True))
    process.signal(signal.SIGHUP)
    done = wait_alive(process, sidecar_state(spool, "slow", "clip.bin", "done"), 15, "slow item done after re-add")
    assert done["error"] is None and done["steps"][0]["state"] == "done"
    wait_alive(process, lambda: (spool / "slow" / "done" / "clip.bin" / "clip.bin").is_file(), 10, "item in done/")
    assert (spool / "slow" / "done" / "clip.bin" / "clip.bin").read_bytes() == b"slow payload"
    assert not (spool / "slow" / "work" / "clip.bin").exists()
    assert (tmp_path / "ran.log").read_text().splitlines() == ["clip.bin"]
    no_crash_in(process)
    assert process.stop() == 0


def hold_config(tmp_path: Path, concurrency: int) -> str:
    return f"""\
        spool: {{spool}}
        rescan: 1s
        queues:
          q:
            settle: 0s
            concurrency: {concurrency}
            chain:
              - exec: {{argv: ['{sys.executable}', '{tmp_path / "hold.py"}', '{{tmp}}', '{{name}}'], timeout: 60s}}
        """


def test_reload_raises_concurrency_of_a_busy_queue(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                   daemon: Start) -> None:  # fmt: skip
    (tmp_path / "hold.py").write_text(HOLD)
    running = tmp_path / "running"
    running.mkdir()
    process = daemon(write_config(hold_config(tmp_path, 1)))
    names = ["a.txt", "b.txt", "c.txt"]
    for name in names:
        (spool / "q" / "inbox" / name).write_text(name)

    def one_running() -> bool:
        states = sorted(str(state_of(spool, "q", n)) for n in names)
        return states == ["queued", "queued", "running"] and len(os.listdir(running)) == 1

    wait_alive(process, one_running, 10, "one item running, two queued")

    write_config(hold_config(tmp_path, 3))
    process.signal(signal.SIGHUP)
    wait_alive(process, lambda: sorted(os.listdir(running)) == names, 10, "three items running at once")
    assert all(state_of(spool, "q", n) == "running" for n in names)

    (tmp_path / "release").touch()
    for name in names:
        wait_alive(process, sidecar_state(spool, "q", name, "done"), 15, f"{name} done")
        wait_alive(process, lambda n=name: (spool / "q" / "done" / n / n).is_file(), 5, f"{name} in done/")
    assert os.listdir(running) == []
    no_crash_in(process)
    assert process.stop() == 0


# ---- internal errors ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patch", [PATCH_RAISES, PATCH_UNUSABLE_RESULT], ids=["step-raises", "unusable-result"])
def test_internal_error_in_a_step_is_retried_then_fails(patch: str, tmp_path: Path, write_config: WriteConfig,
                                                        spool: Path, daemon: Start) -> None:  # fmt: skip
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(patch)
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          q:
            settle: 0s
            retry: {attempts: 3, delays: [0s, 1s, 1s]}
            chain:
              - checksum: {}
        """)
    process = daemon(config, env={"PYTHONPATH": python_path})
    (spool / "q" / "inbox" / "x.bin").write_bytes(b"payload")

    retrying: list[dict[str, Any]] = []

    def finished() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "q", "x.bin")
        if doc and doc["state"] == "retrying":
            retrying.append(doc)
        return doc if doc and doc["state"] == "failed" else None

    try:
        failed = wait_alive(process, finished, 20, "failed after 3 attempts")
    except AssertionError as exc:
        doc = read_sidecar(spool, "q", "x.bin")
        raise AssertionError(f"{exc}; {len(retrying)} retrying sidecars seen; last sidecar: {doc}") from None
    assert retrying, "the sidecar never said retrying"
    for doc in retrying:
        error = doc["error"]
        assert error["type"] == "internal" and error["step"] == "checksum" and error["retryable"] is True
        assert doc["next_attempt_at"] is not None
        if patch is PATCH_RAISES:
            assert "boom" in error["message"]
        else:
            assert error["message"]
    assert sorted({d["attempts"] for d in retrying}) == [1, 2], "attempts must grow from one retry to the next"

    assert failed["attempts"] == 3 and failed["steps"][0]["attempt"] == 3
    assert failed["error"]["type"] == "internal" and failed["next_attempt_at"] is None
    assert failed["payload"] == ["x.bin"], "a result that cannot be applied must not be half applied"
    wait_alive(process, lambda: (spool / "q" / "failed" / "x.bin" / "x.bin").is_file(), 10, "item in failed/")
    assert (spool / "q" / "failed" / "x.bin" / "x.bin").read_bytes() == b"payload"
    assert not (spool / "q" / "work" / "x.bin").exists()
    alive(process)
    assert process.stop() == 0


# ---- folder operations that fail inside the loop --------------------------------------------------------------


def test_failed_folder_unusable_then_repaired(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          q:
            settle: 0s
            chain:
              - exec: {argv: ['false']}
          ok:
            settle: 0s
            chain:
              - checksum: {}
        """)
    process = daemon(config)
    failed_dir = spool / "q" / "failed"
    failed_dir.rmdir()
    failed_dir.write_text("a file where failed/ should be")

    (spool / "q" / "inbox" / "bad.txt").write_text("bad")
    doc = wait_alive(process, sidecar_state(spool, "q", "bad.txt", "failed"), 10, "bad.txt failed")
    assert doc["error"]["retryable"] is False
    (spool / "ok" / "inbox" / "one.txt").write_text("one")
    wait_alive(process, sidecar_state(spool, "ok", "one.txt", "done"), 10, "the other queue still works")
    met = process.log().count("q/bad.txt: cannot pick up from work/")
    wait_alive(process, lambda: process.log().count("q/bad.txt: cannot pick up from work/") >= met + 2, 10,
               "two rescans to meet the broken folder")  # fmt: skip
    assert (spool / "q" / "work" / "bad.txt" / "bad.txt").read_text() == "bad", "the item must stay whole in work/"

    failed_dir.unlink()
    failed_dir.mkdir()
    wait_alive(process, lambda: (failed_dir / "bad.txt" / "bad.txt").is_file(), 10, "item moved to failed/ once fixed")
    assert not (spool / "q" / "work" / "bad.txt").exists()
    assert state_of(spool, "q", "bad.txt") == "failed"
    (spool / "ok" / "inbox" / "two.txt").write_text("two")
    wait_alive(process, sidecar_state(spool, "ok", "two.txt", "done"), 10, "the other queue still works")
    assert process.stop() == 0


def test_work_folder_replaced_by_a_file(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          q:
            settle: 0s
            chain:
              - checksum: {}
          ok:
            settle: 0s
            chain:
              - checksum: {}
        """)
    process = daemon(config)
    (spool / "q" / "inbox" / "first.txt").write_text("first")
    wait_alive(process, sidecar_state(spool, "q", "first.txt", "done"), 10, "first.txt done")
    wait_alive(process, lambda: (spool / "q" / "done" / "first.txt").is_dir(), 5, "first.txt in done/")

    work = spool / "q" / "work"
    shutil.rmtree(work)
    work.write_text("a file where work/ should be")
    (spool / "q" / "inbox" / "second.txt").write_text("second")  # cannot be claimed now
    (spool / "ok" / "inbox" / "one.txt").write_text("one")
    wait_alive(process, sidecar_state(spool, "ok", "one.txt", "done"), 10, "the other queue still works")
    met = process.log().count("q/second.txt: cannot claim")
    wait_alive(process, lambda: process.log().count("q/second.txt: cannot claim") >= met + 2, 10,
               "two rescans to meet the broken folder")  # fmt: skip
    (spool / "ok" / "inbox" / "two.txt").write_text("two")
    wait_alive(process, sidecar_state(spool, "ok", "two.txt", "done"), 10, "the other queue keeps working")
    copies = [p for p in (spool / "q").rglob("second.txt") if p.is_file()]
    assert [p.read_text() for p in copies] == ["second"], "the unclaimable arrival must not be lost"

    # Once the folder is back, the next rescan claims what waited.
    work.unlink()
    work.mkdir()
    wait_alive(process, sidecar_state(spool, "q", "second.txt", "done"), 10, "second.txt done once work/ is back")
    alive(process)
    assert process.stop() == 0


def test_a_rejected_non_utf8_name_reaches_health_json_intact(
    spool: Path, daemon: Start, write_config: WriteConfig
) -> None:
    """The newest error in health.json names the item; a name that is not UTF-8 must not stop that write."""
    process = daemon(write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          q:
            settle: 0s
            chain: [checksum]
        """))  # a FIFO made in place sends no close or move event: the rescan finds it
    raw = b"caf\xe9-\x1b[31m.bin"
    os.mkfifo(os.path.join(os.fsencode(spool / "q" / "inbox"), raw))

    def health_names_it() -> dict[str, Any] | None:
        health = json.loads((spool / "health.json").read_text())
        error = health.get("last_error") or {}
        return health if error.get("item") == os.fsdecode(raw) else None

    health = wait_for(health_names_it, 15, "health.json naming the rejected item")
    assert health["last_error"]["type"] == "rejected"
    assert process.process is not None and process.process.poll() is None
    assert (spool / "health.json").read_bytes().decode("utf-8")  # still UTF-8 on disk


def test_retention_prunes_data_then_sidecars_and_keeps_the_young(
    spool: Path, daemon: Start, write_config: WriteConfig
) -> None:
    daemon(write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          short:
            settle: 0s
            keep: {done: 1s, failed: 1s, status: 2s}
            chain: [checksum]
          long:
            settle: 0s
            chain: [checksum]
        """))
    for queue in ("short", "long"):
        (spool / queue / "inbox" / "a.bin").write_bytes(b"a")
    wait_for(sidecar_state(spool, "long", "a.bin", "done"), 10, "long item done")
    wait_for(lambda: not (spool / "short" / "done" / "a.bin").exists(), 10, "short item's data pruned")
    wait_for(lambda: not (spool / "short" / "status" / "a.bin.json").exists(), 10, "short item's sidecar pruned")
    # Several rescans have passed: the item kept for 7 days is still whole.
    assert (spool / "long" / "done" / "a.bin" / "a.bin").read_bytes() == b"a"
    assert read_sidecar(spool, "long", "a.bin") is not None


def test_a_daemon_with_local_queues_only_loads_no_sqlite_nor_ssh_crypto(write_config: WriteConfig, spool: Path,
                                                                        daemon: Start, tmp_path: Path) -> None:
    """What only some queues need stays out of a daemon that has none of them (512 MB boards): SQLite (a `cache:`)
    and cryptography's native module (paramiko, for sftp:// and ssh://), seen in the process's own mappings."""
    out = tmp_path / "out"
    run = daemon(write_config(f"""
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            chain:
              - checksum: {{algorithms: [sha256, xxh3_128]}}
              - ship: {{to: 'file://{out}/'}}
        """))
    (spool / "q" / "inbox" / "a.bin").write_bytes(b"x" * 4096)
    wait_for(sidecar_state(spool, "q", "a.bin", "done"), 30, "the item shipped")
    assert run.process is not None
    mapped = Path(f"/proc/{run.process.pid}/maps").read_text()
    assert "xxhash" in mapped, "the mappings are the daemon's (it hashed with xxhash)"
    assert "sqlite" not in mapped
    assert "cryptography" not in mapped and "_rust.abi3" not in mapped
