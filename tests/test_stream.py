"""encode with `stream: true`: encoding starts while frames land in the inbox, against the real ffmpeg,
real inotify and the daemon as a subprocess."""

from __future__ import annotations

import calendar
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold import media
from tests.conftest import DaemonProcess, make_frames, read_sidecar, sidecar_state, wait_for

Daemon = Callable[..., DaemonProcess]
WriteConfig = Callable[..., Path]

STREAM = """
spool: {spool}
rescan: 1s
queues:
  episodes:
    items: bundles
    retry: {attempts: 2, delays: [0s]}
    chain:
      - encode: {fps: 30, preset: ultrafast, crf: 30, stream: true}
      - checksum: {algorithms: [sha256]}
"""
CAMERAS = ("cam_left", "cam_right")


@pytest.fixture
def frames(tmp_path: Path, ffmpeg: str) -> Path:
    """60 numbered source frames, copied into the inbox by the producers below."""
    source = tmp_path / "frames"
    make_frames(source, count=60, size="160x120")
    return source


class Producer:
    """Writes an episode into the inbox frame by frame at `fps`, as a recorder would."""

    def __init__(self, source: Path, episode: Path, numbers: list[int], fps: float = 30.0, rename_in: bool = False):
        self.source, self.episode, self.numbers, self.fps, self.rename_in = source, episode, numbers, fps, rename_in
        self.written = threading.Event()
        self.count = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Producer:
        for camera in CAMERAS:
            (self.episode / camera).mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        for index, number in enumerate(self.numbers):
            for camera in CAMERAS:
                data = (self.source / f"frame_{min(number, 60):06d}.png").read_bytes()
                target = self.episode / camera / f"frame_{number:06d}.png"
                if self.rename_in:
                    hidden = target.with_name(f".{target.name}.tmp")
                    hidden.write_bytes(data)
                    hidden.rename(target)
                else:
                    target.write_bytes(data)
            self.count = index + 1
            time.sleep(max(0.0, start + (index + 1) / self.fps - time.monotonic()))  # pacing, not synchronisation
        self.written.set()

    def finish(self, fields: dict[str, Any] | None = None) -> float:
        assert self.written.wait(30), "the producer did not finish"
        (self.episode.parent / f"{self.episode.name}.ready").write_text(json.dumps(fields or {}))
        return time.time()


def encode_step(spool: Path, item: str) -> dict[str, Any]:
    doc = read_sidecar(spool, "episodes", item) or {}
    return (doc.get("steps") or [{}])[0]


def arriving_progress(spool: Path, item: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "episodes", item)
        cameras = encode_step(spool, item).get("progress", {}).get("cameras", {})
        if doc and doc.get("arriving") and cameras and all(c["frames_done"] > 0 for c in cameras.values()):
            return doc
        return None

    return check


def frames_seen(spool: Path, item: str) -> dict[str, int]:
    """How many frames of each camera the encode has seen so far (its progress in the sidecar)."""
    cameras = encode_step(spool, item).get("progress", {}).get("cameras", {})
    return {name: camera.get("frames_total", 0) for name, camera in cameras.items()}


def done_with(spool: Path, item: str, frames: int) -> dict[str, Any]:
    """Wait for `item` to be done; check every camera's video holds `frames` frames."""
    doc = wait_for(sidecar_state(spool, "episodes", item, "done"), 30, f"{item} done")
    assert {c["frames"] for c in doc["steps"][0]["result"]["cameras"].values()} == {frames}
    for camera in CAMERAS:
        assert media.probe(spool / "episodes" / "done" / item / f"{camera}.mp4")["frames"] == frames
    return doc


@pytest.fixture
def inbox(spool: Path) -> Iterator[Path]:
    yield spool / "episodes" / "inbox"


def test_encoding_starts_before_the_marker_and_ends_just_after_it(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    from tests.test_cli import spoold

    config = write_config(STREAM)
    daemon(config)
    producer = Producer(frames, inbox / "ep1", list(range(1, 61)), fps=20).start()
    doc = wait_for(arriving_progress(spool, "ep1"), 20, "frames encoded while the episode is still arriving")
    assert doc["state"] == "running" and doc["step"] == "encode"
    assert producer.count < 60, "the episode was complete before any frame was encoded"
    shown = spoold("status", "-c", str(config))
    assert "frames so far; the bundle is still arriving" in shown.stdout, shown.stdout
    assert "still arriving" in spoold("status", "-c", str(config), "episodes", "ep1").stdout
    assert not (spool / "episodes" / "work" / "ep1" / "ep1").exists(), "claimed before its ready marker"
    marked = producer.finish({"operator": "ana"})
    doc = wait_for(sidecar_state(spool, "episodes", "ep1", "done"), 30, "ep1 done")
    assert "arriving" not in doc
    assert doc["fields"] == {"operator": "ana"}
    step = doc["steps"][0]
    assert step["result"]["cameras"]["cam_left"]["frames"] == 60
    finished = calendar.timegm(time.strptime(step["finished"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert finished - marked < 5, "the encode was not ready soon after the marker"
    done = spool / "episodes" / "done" / "ep1"
    for camera in CAMERAS:
        assert media.probe(done / f"{camera}.mp4")["frames"] == 60
        assert len(list((done / "ep1" / camera).glob("*.png"))) == 60
    assert not (inbox / "ep1.ready").exists()
    assert doc["steps"][1]["state"] == "done"


def test_frames_renamed_in_are_taken_too(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(STREAM))
    producer = Producer(frames, inbox / "ep2", list(range(1, 41)), rename_in=True).start()
    wait_for(arriving_progress(spool, "ep2"), 20, "renamed-in frames encoded while arriving")
    producer.finish()
    done_with(spool, "ep2", 40)


def test_a_gap_is_reported_at_the_marker_not_encoded(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(STREAM))
    producer = Producer(frames, inbox / "ep3", [*range(1, 11), *range(13, 31)]).start()
    assert producer.written.wait(20)
    wait_for(lambda: encode_step(spool, "ep3").get("state") == "running", 10, "encode running")
    # The encode has seen every frame, both sides of the gap; nothing may be decided before the marker.
    wait_for(lambda: frames_seen(spool, "ep3") == dict.fromkeys(CAMERAS, 28), 10, "every frame of ep3 seen")
    doc = read_sidecar(spool, "episodes", "ep3")
    assert doc is not None and doc["state"] == "running" and doc.get("arriving") is True
    producer.finish()
    doc = wait_for(sidecar_state(spool, "episodes", "ep3", "failed"), 30, "ep3 failed")
    assert "gap in the frame numbering" in doc["error"]["message"]
    assert "frame_000010.png -> frame_000013.png (2 missing)" in doc["error"]["message"]
    failed = spool / "episodes" / "failed" / "ep3"
    assert len(list((failed / "ep3" / "cam_left").glob("*.png"))) == 28, "frames of a failed item were lost"
    assert not list(failed.glob("*.mp4")), "a video of a gapped camera was kept"


def test_a_first_frame_landing_late_is_encoded_in_order(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(STREAM))
    episode = inbox / "ep4"
    producer = Producer(frames, episode, list(range(5, 31)))
    producer.start()
    wait_for(arriving_progress(spool, "ep4"), 20, "frames from 5 on encoded while arriving")
    assert Producer(frames, episode, list(range(1, 5))).start().written.wait(10), "the late frames were not written"
    producer.finish()
    done_with(spool, "ep4", 30)


def test_a_bundle_removed_before_its_marker_leaves_no_item(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    running = daemon(write_config(STREAM))
    producer = Producer(frames, inbox / "ep5", list(range(1, 21))).start()
    wait_for(arriving_progress(spool, "ep5"), 20, "ep5 arriving")
    assert producer.written.wait(20)
    shutil.rmtree(inbox / "ep5")
    wait_for(lambda: read_sidecar(spool, "episodes", "ep5") is None, 10, "the provisional item dropped")
    for where in ("work", "done", "failed"):
        assert not (spool / "episodes" / where / "ep5").exists()
    # The name is free again: the same episode written anew becomes an item of its own.
    again = Producer(frames, inbox / "ep5", list(range(1, 11))).start()
    again.finish()
    done_with(spool, "ep5", 10)
    assert "dropped" in running.log()


def test_kill_9_while_arriving_then_restart_finishes_the_episode(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    config = write_config(STREAM)
    first = daemon(config)
    producer = Producer(frames, inbox / "ep6", list(range(1, 61)), fps=15).start()
    wait_for(arriving_progress(spool, "ep6"), 20, "ep6 encoding while arriving")
    first.kill()
    assert not producer.written.is_set(), "the episode finished arriving before the kill"
    daemon(config)
    producer.finish()
    done_with(spool, "ep6", 60)


def test_a_marker_with_bad_json_rejects_the_item_keeping_its_frames(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(STREAM))
    producer = Producer(frames, inbox / "ep7", list(range(1, 11))).start()
    assert producer.written.wait(20)
    (inbox / "ep7.ready").write_text("{not json")
    doc = wait_for(sidecar_state(spool, "episodes", "ep7", "failed"), 30, "ep7 rejected")
    assert doc["error"]["type"] == "rejected" and "ready marker" in doc["error"]["message"]
    assert len(list((spool / "episodes" / "failed" / "ep7" / "ep7" / "cam_left").glob("*.png"))) == 10


@pytest.mark.parametrize("change", [
    ("items: bundles", "items: bundles\n    ready: settle"),
    ("      - checksum: {algorithms: [sha256]}\n", ""),
])
def test_stream_must_be_the_first_step_of_a_marker_bundle_queue(
    change: tuple[str, str], write_config: WriteConfig
) -> None:
    from tests.test_cli import spoold

    text = STREAM.replace(*change)
    if not change[1]:  # move encode behind checksum
        text = text.replace("    chain:\n", "    chain:\n      - checksum: {algorithms: [sha256]}\n")
    result = spoold("check", "-c", str(write_config(text)))
    assert result.returncode == 78, result.stderr
    assert "encode" in result.stderr and "ready: marker" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_graceful_stop_while_arriving_ends_ffmpeg_and_resumes_after_restart(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    from tests.test_media import encoders_of

    config = write_config(STREAM)
    first = daemon(config)
    producer = Producer(frames, inbox / "ep8", list(range(1, 61)), fps=15).start()
    wait_for(arriving_progress(spool, "ep8"), 20, "ep8 encoding while arriving")
    assert encoders_of(spool / "episodes" / "work" / "ep8"), "no ffmpeg running while the episode arrives"
    assert first.stop(timeout=15) == 0
    assert not encoders_of(spool / "episodes" / "work" / "ep8"), "ffmpeg outlived a graceful stop"
    doc = read_sidecar(spool, "episodes", "ep8")
    assert doc is not None and doc["state"] == "queued" and doc["arriving"] is True
    daemon(config)
    producer.finish()
    done_with(spool, "ep8", 60)


def test_a_whole_episode_moved_in_then_marked_is_encoded(
    frames: Path, tmp_path: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(STREAM))
    staged = tmp_path / "ep9"
    for camera in CAMERAS:
        shutil.copytree(frames, staged / camera)
    staged.rename(inbox / "ep9")  # no event inside the folder: its frames are found by listing
    wait_for(arriving_progress(spool, "ep9"), 20, "a moved-in episode encoding before its marker")
    (inbox / "ep9.ready").write_text("")
    done_with(spool, "ep9", 60)


def test_a_fifo_named_like_a_frame_is_refused_not_waited_on(
    frames: Path, spool: Path, inbox: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    """A producer drops a FIFO as the next frame while the episode arrives: the feeder must not block opening
    it, the item is rejected at the marker naming it, and a stop ends the daemon at once."""
    run = daemon(write_config(STREAM))
    producer = Producer(frames, inbox / "ep9", list(range(1, 6))).start()
    assert producer.written.wait(20)
    os.mkfifo(inbox / "ep9" / "cam_left" / "frame_000006.png")
    wait_for(lambda: encode_step(spool, "ep9").get("state") == "running", 10, "encode running")
    # The feeder lists the folder and meets the FIFO: it gives up encoding early, it does not block on it.
    wait_for(lambda: "cam_left/frame_000006.png is a FIFO" in run.log(), 20, "the feeder to meet the FIFO")
    producer.finish()
    doc = wait_for(sidecar_state(spool, "episodes", "ep9", "failed"), 5, "ep9 rejected soon after its marker")
    assert "frame_000006.png" in doc["error"]["message"] and "fifo" in doc["error"]["message"].lower()
    assert run.stop(timeout=10) == 0, "the daemon did not stop promptly"
