"""encode, bundle and the video manifests, against the real ffmpeg and the daemon as a subprocess."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spoold import media
from tests.conftest import DaemonProcess, make_frames, read_sidecar, sidecar_state, wait_for

SCHEMA = Path(__file__).resolve().parent.parent / "src/spoold/schemas/soccer-rig-manifest.schema.json"
Daemon = Callable[..., DaemonProcess]
WriteConfig = Callable[..., Path]


def make_episode(tmp: Path, name: str, cameras: tuple[str, ...] = ("cam_left", "cam_right"), **kw: Any) -> Path:
    episode = tmp / "staging" / name
    for camera in cameras:
        make_frames(episode / camera, **kw)
    return episode


def drop_bundle(spool: Path, queue: str, episode: Path) -> None:
    inbox = spool / queue / "inbox"
    episode.rename(inbox / episode.name)
    (inbox / f"{episode.name}.ready").write_text("{}")


def video_frames(path: Path) -> dict[str, Any]:
    return media.probe(path)


EPISODES = """
spool: {spool}
queues:
  episodes:
    items: bundles
    retry: {attempts: 2, delays: [0s]}
    chain:
      - encode: {fps: 30, preset: ultrafast, crf: 28}
      - checksum: {algorithms: [sha256]}
      - manifest: {}
      - ship: {to: 'file://{tmp}/shipped/'}
"""


def test_two_cameras_become_two_videos_and_ship_without_frames(
    ffmpeg: str, tmp_path: Path, spool: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(EPISODES))
    drop_bundle(spool, "episodes", make_episode(tmp_path, "episode_000005"))
    doc = wait_for(sidecar_state(spool, "episodes", "episode_000005", "done"), 60, "episode done")
    encode = doc["steps"][0]
    assert encode["result"]["outputs"] == ["cam_left.mp4", "cam_right.mp4"]
    assert encode["result"]["cameras"]["cam_left"] == {"frames": 30, "width": 64, "height": 48}
    assert doc["payload"] == ["cam_left.mp4", "cam_right.mp4"]
    item_dir = spool / "episodes" / "done" / "episode_000005"
    for camera in ("cam_left", "cam_right"):
        facts = media.probe(item_dir / f"{camera}.mp4")
        assert (facts["frames"], facts["codec"], facts["pix_fmt"], facts["container"]) == (30, "h264", "yuv420p", "mp4")
        assert (facts["width"], facts["height"], facts["fps"]) == (64, 48, 30.0)
        assert facts["encoder"]["preset"] == "ultrafast"
    assert not (item_dir / ".encode").exists()
    shipped = tmp_path / "shipped" / "episode_000005"
    assert sorted(p.name for p in shipped.iterdir()) == [
        "cam_left.mp4", "cam_right.mp4", "episode_000005.manifest.json"]  # fmt: skip
    manifest = json.loads((shipped / "episode_000005.manifest.json").read_text())
    videos = {f["path"]: f["video"] for f in manifest["files"]}
    assert videos["cam_left.mp4"]["frames"] == 30
    assert videos["cam_right.mp4"]["encoder"]["codec"] == "libx264"
    assert not list(tmp_path.joinpath("shipped").rglob("*.png"))


BAD = """
spool: {spool}
queues:
  bad:
    items: bundles
    concurrency: 2
    retry: {attempts: 1}
    chain:
      - encode: {preset: ultrafast}
  nocodec:
    items: bundles
    chain:
      - encode: {codec: h264_spoold_missing}
"""


def test_bad_frames_fail_with_a_clear_error(
    ffmpeg: str, tmp_path: Path, spool: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(BAD))
    truncated = make_episode(tmp_path, "truncated", count=12)
    frame = truncated / "cam_left" / "frame_000005.png"
    frame.write_bytes(frame.read_bytes()[:-40])
    flipped = make_episode(tmp_path, "flipped", count=12)
    frame = flipped / "cam_right" / "frame_000007.png"
    data = bytearray(frame.read_bytes())
    data[len(data) // 2] ^= 0xFF
    frame.write_bytes(bytes(data))
    empty = make_episode(tmp_path, "empty", cameras=("cam_left",), count=12)
    (empty / "cam_right").mkdir()
    mixed = make_episode(tmp_path, "mixed", count=12)
    make_frames(tmp_path / "small", count=1, size="32x24", start=9)
    shutil.copy(tmp_path / "small" / "frame_000009.png", mixed / "cam_right" / "frame_000009.png")
    gap = make_episode(tmp_path, "gap", count=12)
    (gap / "cam_left" / "frame_000010.png").unlink()
    for episode in (truncated, flipped, empty, mixed, gap):
        drop_bundle(spool, "bad", episode)
    drop_bundle(spool, "nocodec", make_episode(tmp_path, "nocodec", count=3))
    expected = {
        ("bad", "truncated"): "cam_left/frame_000005.png: truncated PNG",
        ("bad", "flipped"): "cam_right/frame_000007.png: corrupt PNG",
        ("bad", "empty"): "camera folder cam_right has no frames matching '*.png'",
        ("bad", "mixed"): "cam_right: mixed resolutions: frame_000001.png is 64x48 but frame_000009.png is 32x24",
        ("bad", "gap"): "cam_left: gap in the frame numbering: frame_000009.png -> frame_000011.png (1 missing)",
        ("nocodec", "nocodec"): "encoder 'h264_spoold_missing' is not available",
    }
    for (queue, item), message in expected.items():
        doc = wait_for(sidecar_state(spool, queue, item, "failed"), 30, f"{item} failed")
        assert message in doc["error"]["message"], doc["error"]
        assert doc["error"]["retryable"] is False
        assert (spool / queue / "failed" / item).is_dir()
        assert not list((spool / queue / "failed" / item).glob("*.mp4"))


def encoders_of(item_dir: Path) -> list[int]:
    """Pids of running processes whose command line names `item_dir` (the encode's ffmpeg children)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(item_dir).encode() in (proc / "cmdline").read_bytes():
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    pids.append(int(proc.name))
        except OSError:
            pass
    return pids


KILL = """
spool: {spool}
queues:
  episodes:
    items: bundles
    chain:
      - encode: {preset: veryslow, crf: 18}
"""


@pytest.mark.slow
def test_kill_9_mid_encode_then_restart_encodes_cleanly(
    ffmpeg: str, tmp_path: Path, spool: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    config = write_config(KILL)
    first = daemon(config)
    drop_bundle(spool, "episodes", make_episode(tmp_path, "ep1", count=60, size="320x240", noise=True))
    item_dir = spool / "episodes" / "work" / "ep1"

    def encoding() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "episodes", "ep1")
        cameras = ((doc or {}).get("steps") or [{}])[0].get("progress", {}).get("cameras", {})
        return doc if cameras and cameras["cam_left"]["frames_done"] > 0 else None

    doc = wait_for(encoding, 30, "per-camera progress")
    assert doc["steps"][0]["progress"]["cameras"]["cam_right"]["frames_total"] == 60
    first.kill()
    doc = read_sidecar(spool, "episodes", "ep1")
    assert doc is not None and doc["state"] == "running", "the encode finished before the kill; make it slower"
    assert not list(item_dir.glob("*.mp4")), "a video was renamed into place before it was complete"
    if shutil.which("setpriv"):
        wait_for(lambda: not encoders_of(item_dir), 10, "orphaned ffmpeg gone with its daemon")
    second = daemon(config)
    wait_for(encoding, 30, "encoding again after the restart")
    assert second.stop() == 0
    assert not encoders_of(item_dir), "ffmpeg outlived a graceful stop"
    assert sidecar_state(spool, "episodes", "ep1", "queued")()
    daemon(config)
    wait_for(sidecar_state(spool, "episodes", "ep1", "done"), 90, "ep1 done after restart")
    done = spool / "episodes" / "done" / "ep1"
    for camera in ("cam_left", "cam_right"):
        assert media.probe(done / f"{camera}.mp4")["frames"] == 60
    assert not (done / ".encode").exists()


BUNDLES = """
spool: {spool}
queues:
  tars:
    items: bundles
    chain:
      - bundle: {format: tar}
      - ship: {to: 'file://{tmp}/shipped/{name}.tar'}
  zips:
    items: bundles
    chain:
      - bundle: {format: zip, compression: 6}
"""


def test_bundle_tar_and_zip_keep_relative_paths(
    tmp_path: Path, spool: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    daemon(write_config(BUNDLES))
    for queue in ("tars", "zips"):
        folder = tmp_path / "staging" / queue / "data1"
        (folder / "a" / "b").mkdir(parents=True)
        (folder / "a" / "b" / "deep.txt").write_text("deep\n")
        (folder / "top.bin").write_bytes(bytes(range(256)) * 100)
        drop_bundle(spool, queue, folder)
    tar_doc = wait_for(sidecar_state(spool, "tars", "data1", "done"), 30, "tar done")
    zip_doc = wait_for(sidecar_state(spool, "zips", "data1", "done"), 30, "zip done")
    tar_path = spool / "tars" / "done" / "data1" / "data1.tar"
    with tarfile.open(tar_path) as archive:
        assert sorted(archive.getnames()) == ["data1/a/b/deep.txt", "data1/top.bin"]
        member = archive.extractfile("data1/a/b/deep.txt")
        assert member is not None and member.read() == b"deep\n"
    sha = hashlib.sha256(tar_path.read_bytes()).hexdigest()
    assert tar_doc["steps"][0]["result"]["sha256"] == sha
    assert tar_doc["payload"] == ["data1.tar"]
    assert hashlib.sha256((tmp_path / "shipped" / "data1.tar").read_bytes()).hexdigest() == sha
    assert tar_doc["steps"][1]["result"]["verified"] is True
    zip_path = spool / "zips" / "done" / "data1" / "data1.zip"
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.testzip() is None
        assert sorted(archive.namelist()) == ["data1/a/b/deep.txt", "data1/top.bin"]
        assert archive.getinfo("data1/top.bin").compress_size < 25600
    assert zip_doc["steps"][0]["result"]["sha256"] == hashlib.sha256(zip_path.read_bytes()).hexdigest()


RECORDINGS = """
spool: {spool}
queues:
  recordings:
    settle: 200ms
    fields: {pattern: '^(?P<session_id>.+)_(?P<camera_id>CAM_[LCR])\\.mp4$'}
    chain:
      - checksum: {algorithms: [sha256], sumfile: true}
      - manifest: {layout: soccer-rig, name: manifest.json, fields: {ntp_synced: true, dropped_frames: 0}}
"""


def test_soccer_rig_manifest_matches_the_002_schema(
    ffmpeg: str, tmp_path: Path, spool: Path, daemon: Daemon, write_config: WriteConfig
) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    daemon(write_config(RECORDINGS))
    name = "GAME_20240315_140000_CAM_C.mp4"
    tmp_video = tmp_path / name
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=30", "-frames:v", "45",
                    "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", str(tmp_video)],
                   check=True)  # fmt: skip
    tmp_video.rename(spool / "recordings" / "inbox" / name)
    wait_for(sidecar_state(spool, "recordings", name, "done"), 30, "recording done")
    done = spool / "recordings" / "done" / name
    manifest = json.loads((done / "manifest.json").read_text())
    jsonschema.validate(manifest, schema)
    assert manifest["recording"] == {"id": "GAME_20240315_140000_CAM_C", "session_id": "GAME_20240315_140000",
                                     "camera_id": "CAM_C", "position": "center"}  # fmt: skip
    assert manifest["file"]["name"] == name
    assert (manifest["file"]["container"], manifest["file"]["codec"]) == ("mp4", "h264")
    assert manifest["video"]["resolution"] == {"width": 64, "height": 48}
    assert (manifest["video"]["fps"], manifest["video"]["duration_sec"]) == (30, 1.5)
    assert manifest["checksum"]["value"] == hashlib.sha256((done / name).read_bytes()).hexdigest()
    assert manifest["timing"]["ntp_synced"] is True
    assert manifest["quality"] == {"dropped_frames": 0}


def test_the_002_example_validates_and_a_wrong_manifest_does_not() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text())
    example = {
        "version": "1.0",
        "recording": {"id": "GAME_20240315_140000_CAM_C", "session_id": "GAME_20240315_140000",
                      "camera_id": "CAM_C", "position": "center"},
        "file": {"name": "GAME_20240315_140000_CAM_C.mp4", "size_bytes": 12345678, "container": "mp4", "codec": "h265"},
        "video": {"resolution": {"width": 3840, "height": 2160}, "fps": 30, "bitrate_mbps": 30, "duration_sec": 5400.5},
        "timing": {"start_time": "2024-03-15T14:00:00.123456Z", "end_time": "2024-03-15T15:30:00.654321Z",
                   "ntp_synced": True, "sync_offset_ms": 2.3},
        "checksum": {"algorithm": "sha256", "value": "abc123def456"},
        "device": {"hostname": "soccer-rig-cam-c", "ip_address": "192.168.1.102", "software_version": "1.0.0"},
        "quality": {"dropped_frames": 0, "temperature_avg_c": 55.2, "temperature_max_c": 62.1},
    }  # fmt: skip
    jsonschema.validate(example, schema)
    del example["timing"]["ntp_synced"]  # type: ignore[attr-defined]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(example, schema)


def test_probe_without_ffprobe_parses_ffmpeg(ffmpeg: str, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    subprocess.run([ffmpeg, "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-frames:v", "20",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-metadata", 'comment=spoold-encode {"crf":20}',
                    str(video)], check=True)  # fmt: skip
    binaries = [ffmpeg]
    try:
        import imageio_ffmpeg

        binaries.append(imageio_ffmpeg.get_ffmpeg_exe())
    except ImportError:
        pass
    with_ffprobe = media.probe(video)
    for binary in binaries:
        facts = media._probe_ffmpeg(binary, video)
        summary = (facts["codec"], facts["width"], facts["height"], facts["fps"], facts["frames"])
        assert summary == ("h264", 64, 48, 25.0, 20)
        assert facts["duration_sec"] == pytest.approx(0.8, abs=0.05)
        assert facts["encoder"] == {"crf": 20}
        assert media._container(video, facts["format_names"]) == with_ffprobe["container"] == "mp4"
    assert with_ffprobe["frames"] == 20


def test_encode_options_are_checked_at_load(tmp_path: Path, write_config: WriteConfig) -> None:
    from spoold.daemon.config import load_config
    from spoold.errors import ConfigError

    bad = write_config("""
    spool: {spool}
    queues:
      q:
        items: bundles
        chain:
          - encode: {frames: '../*.png'}
    """)
    with pytest.raises(ConfigError, match="relative glob"):
        load_config(bad)
    assert read_sidecar(tmp_path, "q", "x") is None
