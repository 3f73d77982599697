"""Progress is written at most once a second, and what arrives within that second is written when it is up."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from spoold.daemon.sidecar import Sidecar
from tests.conftest import wait_for


def new_sidecar(tmp_path: Path) -> Sidecar:
    sidecar = Sidecar.new(tmp_path / "item.json", queue="q", item="item", original_name="item", kind="file",
                          fields={}, step_names=["ship"], host="test", payload=["item"])  # fmt: skip
    sidecar.write()
    return sidecar


def flushed(sidecar: Sidecar) -> threading.Event:
    """Set once the sidecar's deferred progress write (scheduled when progress is held back) has run."""
    ran = threading.Event()
    flush = sidecar._flush_progress

    def flush_and_tell() -> None:
        try:
            flush()
        finally:
            ran.set()

    sidecar._flush_progress = flush_and_tell  # type: ignore[method-assign]
    return ran


def on_disk(path: Path) -> dict[str, object]:
    progress: dict[str, object] = json.loads(path.read_text())["steps"][0].get("progress") or {}
    return progress


def test_progress_held_back_by_the_limit_reaches_the_file_without_another_write(tmp_path: Path) -> None:
    sidecar = new_sidecar(tmp_path)
    sidecar.set_progress(0, {"bytes_done": 1, "bytes_total": 10})
    sidecar.set_progress(0, {"bytes_done": 10, "bytes_total": 10, "log_tail": ["last line"]})
    # Both came within the second after the sidecar's last write (which carried the progress so far).
    assert on_disk(sidecar.path) == {}, "progress was written within a second of the last write"
    wait_for(lambda: on_disk(sidecar.path).get("bytes_done") == 10, 5, "the held-back progress to be written")
    assert on_disk(sidecar.path)["log_tail"] == ["last line"]


def test_a_step_shorter_than_a_second_writes_no_progress_of_its_own(tmp_path: Path) -> None:
    """A small item's step costs its start and its end, not a durable write of its progress in between."""
    sidecar = new_sidecar(tmp_path)
    ran = flushed(sidecar)
    sidecar.set_progress(0, {"bytes_done": 1024, "bytes_total": 1024})
    sidecar.write()  # the step's end
    mtime = sidecar.path.stat().st_mtime_ns
    assert ran.wait(5), "the held-back progress write never came due"
    assert sidecar.path.stat().st_mtime_ns == mtime, "the held-back progress was written after the step's end"


def test_a_removed_sidecar_is_not_brought_back_by_held_back_progress(tmp_path: Path) -> None:
    sidecar = new_sidecar(tmp_path)
    ran = flushed(sidecar)
    sidecar.set_progress(0, {"bytes_done": 1, "bytes_total": 10})
    sidecar.set_progress(0, {"bytes_done": 2, "bytes_total": 10})
    sidecar.remove()
    assert ran.wait(5), "the held-back progress write never came due"
    assert not sidecar.path.exists(), "held-back progress recreated a removed sidecar"
