"""The `soccer-rig` manifest layout: exactly the manifest of the soccer rig offload protocol (field note 002).

One recording per item: `recording.session_id` and `camera_id` come from the
item's fields (e.g. a queue `fields.pattern` on `GAME_20240315_140000_CAM_C.mp4`),
`position` from the fields or else from the camera id (CAM_L/C/R -> left,
center, right). The video facts come from ffprobe, the checksum from the
checksum step (computed here when that step did not run). Timing, device and
quality values may be given as fields (`start_time`, `end_time`, `ntp_synced`,
`sync_offset_ms`, `hostname`, `ip_address`, `software_version`,
`dropped_frames`, `temperature_avg_c`, `temperature_max_c`, `bitrate_mbps`);
otherwise the end time is the file's mtime, the start time that minus the
duration, and `ntp_synced` whether systemd-timesyncd says the clock is synced.
The JSON Schema is `spoold/schemas/soccer-rig-manifest.schema.json`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold import __version__
from spoold.digest import hash_file
from spoold.errors import PermanentError
from spoold.handlers.base import StepContext
from spoold.handlers.checksum import payload_files
from spoold.media import probe

MANIFEST_VERSION = "1.0"
POSITIONS = {"CAM_L": "left", "CAM_C": "center", "CAM_R": "right"}
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi")
TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")


def soccer_rig_manifest(ctx: StepContext, static_fields: dict[str, Any]) -> dict[str, Any]:
    fields = {**ctx.fields, **static_fields}
    videos = [p for p in payload_files(ctx) if p.suffix.lower() in VIDEO_SUFFIXES]
    if len(videos) != 1:
        raise PermanentError(f"the soccer-rig manifest describes one recording; the payload holds {len(videos)} videos")
    video = videos[0]
    session_id, camera_id = _required(fields, "session_id"), _required(fields, "camera_id")
    position = fields.get("position") or POSITIONS.get(camera_id)
    if position is None:
        raise PermanentError(f"no position for camera {camera_id!r}: set field `position` (left, center or right)")
    facts = probe(video)
    relative = str(video.relative_to(ctx.item_dir))
    sha256 = ctx.digests.get(relative, {}).get("sha256") or hash_file(video, ["sha256"])["sha256"]
    stat = video.stat()
    duration = float(facts["duration_sec"] or 0.0)
    timing: dict[str, Any] = {
        "start_time": str(fields.get("start_time") or _iso(stat.st_mtime - duration)),
        "end_time": str(fields.get("end_time") or _iso(stat.st_mtime)),
        "ntp_synced": bool(fields["ntp_synced"]) if "ntp_synced" in fields else TIMESYNC_FLAG.exists(),
    }
    if "sync_offset_ms" in fields:
        timing["sync_offset_ms"] = float(fields["sync_offset_ms"])
    device = {
        "hostname": str(fields.get("hostname") or ctx.render("{host}")),
        **({"ip_address": str(fields["ip_address"])} if "ip_address" in fields else {}),
        "software_version": str(fields.get("software_version") or __version__),
    }
    quality = {key: cast(fields[key]) for key, cast in _QUALITY.items() if key in fields}
    is_single_file = len(ctx.payload) == 1 and ctx.payload[0] == video
    return {
        "version": MANIFEST_VERSION,
        "recording": {
            "id": str(fields.get("recording_id") or f"{session_id}_{camera_id}"),
            "session_id": session_id,
            "camera_id": camera_id,
            "position": str(position),
        },
        "file": {
            "name": ctx.item if is_single_file else video.name,
            "size_bytes": stat.st_size,
            "container": facts["container"],
            "codec": facts["codec"],
        },
        "video": {
            "resolution": {"width": facts["width"], "height": facts["height"]},
            "fps": round(facts["fps"] or 0),
            "bitrate_mbps": int(fields.get("bitrate_mbps") or round(facts["bitrate_bps"] / 1e6)),
            "duration_sec": round(duration, 3),
        },
        "timing": timing,
        "checksum": {"algorithm": "sha256", "value": sha256},
        "device": device,
        "quality": quality,
    }


_QUALITY: dict[str, Any] = {"dropped_frames": int, "temperature_avg_c": float, "temperature_max_c": float}


def _required(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if value in (None, ""):
        raise PermanentError(f"the soccer-rig manifest needs field {name!r} (e.g. from the queue's fields pattern)")
    return str(value)


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
