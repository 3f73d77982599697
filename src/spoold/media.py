"""ffmpeg and ffprobe for the media handlers: finding them, probing videos, checking frames.

`find_ffmpeg()` prefers the system binary on PATH and falls back to the one the
`imageio-ffmpeg` wheel bundles (`pip install spoold[media]` is then enough).
That wheel ships no ffprobe, so `probe()` parses `ffmpeg -i` output and counts
frames by remuxing to the null muxer when ffprobe is missing.
`frame_size()` reads a PNG or JPEG header and checks the file is complete,
without decoding it, so a truncated frame is named before ffmpeg starts.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

from spoold.errors import MissingDependency, PermanentError, TransientError

PROBE_TIMEOUT_SECONDS = 120.0
# The encode handler tags each video with its settings under this prefix (mp4 keeps `comment`).
ENCODE_TAG_PREFIX = "spoold-encode "
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CONTAINER_BY_SUFFIX = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".avi": "avi"}
_CODEC_NAMES = {"hevc": "h265"}


@functools.cache
def find_ffmpeg(preference: str = "auto") -> str:
    """Path of the ffmpeg to use: `preference` if it is a path, else PATH, else imageio-ffmpeg's."""
    if preference != "auto":
        found = shutil.which(preference)
        if found is None:
            raise PermanentError(f"ffmpeg {preference!r} is not an executable file")
        return found
    found = shutil.which("ffmpeg")
    if found is not None:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MissingDependency(
            "ffmpeg is not installed: install it (apt install ffmpeg) or `pip install spoold[media]`"
        ) from None
    return str(imageio_ffmpeg.get_ffmpeg_exe())


@functools.cache
def find_ffprobe(ffmpeg: str) -> str | None:
    """The ffprobe beside `ffmpeg`, else on PATH, else None (imageio-ffmpeg has none)."""
    sibling = Path(ffmpeg).with_name("ffprobe")
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("ffprobe")


@functools.cache
def encoders(ffmpeg: str) -> frozenset[str]:
    """Names of the video encoders compiled into `ffmpeg` (`ffmpeg -encoders`)."""
    out = _run([ffmpeg, "-hide_banner", "-encoders"])
    names = set()
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and len(parts[0]) == 6 and parts[0][0] == "V":
            names.add(parts[1])
    return frozenset(names)


def probe(path: Path, ffmpeg: str = "auto") -> dict[str, Any]:
    """Facts of the first video stream: container, codec, width, height, fps, duration, frames, bitrate.

    Frames are counted from packets (one per frame for the codecs spoold writes), not taken from
    the header, so a video cut short by a crash shows its real length.
    """
    binary = find_ffmpeg(ffmpeg)
    ffprobe = find_ffprobe(binary)
    facts = _probe_ffprobe(ffprobe, path) if ffprobe else _probe_ffmpeg(binary, path)
    facts["container"] = _container(path, facts.pop("format_names"))
    facts["codec"] = _CODEC_NAMES.get(facts["codec"], facts["codec"])
    return facts


def describe_video(path: Path) -> dict[str, Any]:
    """The manifest's per-file video facts; a video that cannot be probed says why instead."""
    try:
        return {"video": probe(path)}
    except (PermanentError, TransientError) as exc:
        return {"video": {"error": str(exc)}}


def _probe_ffprobe(ffprobe: str, path: Path) -> dict[str, Any]:
    out = _run([ffprobe, "-v", "error", "-select_streams", "v:0", "-count_packets", "-of", "json", "-show_entries",
                "stream=codec_name,width,height,pix_fmt,avg_frame_rate,r_frame_rate,nb_read_packets,bit_rate"
                ":format=format_name,duration,bit_rate:format_tags=comment", str(path)])  # fmt: skip
    if out.returncode != 0:
        raise PermanentError(f"{path.name} is not a readable video: {out.stderr.strip()[-500:]}")
    data = json.loads(out.stdout or "{}")
    streams = data.get("streams") or []
    if not streams:
        raise PermanentError(f"{path.name} has no video stream")
    stream, fmt = streams[0], data.get("format", {})
    fps = _rate(stream.get("avg_frame_rate")) or _rate(stream.get("r_frame_rate"))
    return {
        "format_names": str(fmt.get("format_name", "")),
        "codec": str(stream.get("codec_name", "")),
        "width": int(stream.get("width", 0)),
        "height": int(stream.get("height", 0)),
        "pix_fmt": stream.get("pix_fmt"),
        "fps": fps,
        "duration_sec": _float(fmt.get("duration")),
        "frames": int(stream.get("nb_read_packets") or 0),
        "bitrate_bps": int(_float(stream.get("bit_rate")) or _float(fmt.get("bit_rate")) or 0),
        "encoder": _encode_tag(fmt.get("tags", {}).get("comment")),
    }


_INPUT = re.compile(r"^Input #0, (?P<formats>[^ ]+), from ", re.M)
_DURATION = re.compile(r"Duration: (\d+):(\d+):(\d+(?:\.\d+)?).*?bitrate: (\d+) kb/s")
_VIDEO = re.compile(r"Stream #0:\d+.*?: Video: (?P<codec>\w+)[^,]*(?:\([^)]*\))?, (?P<pix>\w+)(?:\([^)]*\))?,"
                    r" (?P<w>\d+)x(?P<h>\d+).*?(?:, (?P<kbps>\d+) kb/s)?(?:, (?P<fps>[\d.]+) fps)")  # fmt: skip
_COMMENT = re.compile(r"^\s*comment\s*: (.*)$", re.M)
_FRAME = re.compile(r"frame=\s*(\d+)")


def _probe_ffmpeg(ffmpeg: str, path: Path) -> dict[str, Any]:
    # Without ffprobe: `ffmpeg -i` describes the input on stderr; copying the stream to the null
    # muxer counts its packets without decoding.
    out = _run([ffmpeg, "-hide_banner", "-nostdin", "-i", str(path), "-map", "0:v:0", "-c", "copy", "-f", "null", "-"])
    text = out.stderr
    head = text.split("Stream mapping:", 1)[0]
    video = _VIDEO.search(head)
    if out.returncode != 0 or video is None:
        raise PermanentError(f"{path.name} is not a readable video: {text.strip()[-500:]}")
    fmt = _INPUT.search(head)
    duration = _DURATION.search(head)
    frames = _FRAME.findall(text.split("Stream mapping:", 1)[-1])
    comment = _COMMENT.search(head)
    seconds = None
    if duration:
        hours, minutes, secs = duration.group(1, 2, 3)
        seconds = int(hours) * 3600 + int(minutes) * 60 + float(secs)
    kbps = video.group("kbps") or (duration.group(4) if duration else None)
    return {
        "format_names": fmt.group("formats") if fmt else "",
        "codec": video.group("codec"),
        "width": int(video.group("w")),
        "height": int(video.group("h")),
        "pix_fmt": video.group("pix"),
        "fps": float(video.group("fps")),
        "duration_sec": seconds,
        "frames": int(frames[-1]) if frames else 0,
        "bitrate_bps": int(kbps) * 1000 if kbps else 0,
        "encoder": _encode_tag(comment.group(1).strip() if comment else None),
    }


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, errors="replace", stdin=subprocess.DEVNULL,
                              timeout=PROBE_TIMEOUT_SECONDS, check=False)  # fmt: skip
    except FileNotFoundError:
        raise PermanentError(f"cannot run {argv[0]}: not found") from None
    except subprocess.TimeoutExpired:
        raise TransientError(f"{os.path.basename(argv[0])} took longer than {PROBE_TIMEOUT_SECONDS:g}s") from None


def _container(path: Path, format_names: str) -> str:
    names = [n for n in format_names.split(",") if n]
    by_suffix = _CONTAINER_BY_SUFFIX.get(path.suffix.lower())
    if by_suffix and (by_suffix in names or not names):
        return by_suffix
    return names[0] if names else path.suffix.lstrip(".").lower()


def _rate(text: object) -> float | None:
    if not isinstance(text, str) or "/" not in text:
        return None
    num, den = text.split("/", 1)
    return round(int(num) / int(den), 3) if int(den) else None


def _float(value: object) -> float | None:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _encode_tag(comment: object) -> dict[str, Any] | None:
    if not isinstance(comment, str) or not comment.startswith(ENCODE_TAG_PREFIX):
        return None
    try:
        value = json.loads(comment[len(ENCODE_TAG_PREFIX) :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FrameError(PermanentError):
    """Raised when a frame file is not a complete PNG or JPEG image."""

    type_name = "invalid_frame"


def frame_size(path: Path) -> tuple[int, int]:
    """(width, height) of a PNG or JPEG frame; FrameError if it is not a complete image file."""
    with open(path, "rb") as stream:
        head = stream.read(64 * 1024)
        size = os.fstat(stream.fileno()).st_size
        stream.seek(max(size - 12, 0))
        tail = stream.read()
    return image_size(path.name, head, tail)


def image_size(name: str, head: bytes, tail: bytes) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG file's first 64 KiB and last 12 bytes; FrameError if incomplete."""
    if head.startswith(PNG_SIGNATURE):
        if len(head) < 33 or head[12:16] != b"IHDR":
            raise FrameError(f"{name}: PNG without an IHDR header")
        if not tail.endswith(b"IEND\xaeB`\x82"):
            raise FrameError(f"{name}: truncated PNG (no IEND chunk at the end)")
        width, height = struct.unpack(">II", head[16:24])
        return width, height
    if head.startswith(b"\xff\xd8"):
        if not tail.rstrip(b"\x00").endswith(b"\xff\xd9"):
            raise FrameError(f"{name}: truncated JPEG (no end-of-image marker)")
        return _jpeg_size(name, head)
    raise FrameError(f"{name}: not a PNG or JPEG file")


def check_png_chunks(name: str, data: bytes) -> None:
    """Walk a whole PNG in memory and check every chunk's CRC (catches damage in the middle)."""
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, offset)
        end = offset + 8 + length
        if end + 4 > len(data):
            raise FrameError(f"{name}: truncated PNG (chunk runs past the end of the file)")
        (crc,) = struct.unpack_from(">I", data, end)
        if zlib.crc32(data[offset + 4 : end]) != crc:
            kind = data[offset + 4 : offset + 8].decode("latin-1")
            raise FrameError(f"{name}: corrupt PNG (bad CRC in a {kind} chunk at byte {offset})")
        if data[offset + 4 : offset + 8] == b"IEND":
            return
        offset = end + 4
    raise FrameError(f"{name}: truncated PNG (no IEND chunk)")


def _jpeg_size(name: str, head: bytes) -> tuple[int, int]:
    offset = 2
    while offset + 9 <= len(head):
        if head[offset] != 0xFF:
            break
        marker = head[offset + 1]
        (length,) = struct.unpack_from(">H", head, offset + 2)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack_from(">HH", head, offset + 5)
            return width, height
        offset += 2 + length
    raise FrameError(f"{name}: JPEG without a frame header in its first 64 KiB")
