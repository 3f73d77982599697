"""encode: folders of PNG/JPEG frames to one video per camera, with ffmpeg.

Options: `frames` (glob inside the bundle, default `*/*.png`; each distinct
parent folder is one camera), `fps` (default 30), `codec` (default libx264;
any encoder of that ffmpeg, e.g. h264_v4l2m2m, h264_nvenc, libx265),
`preset`, `crf`, `pix_fmt` (default yuv420p), `ffmpeg` (path or `auto`: the
system ffmpeg, else the one bundled by imageio-ffmpeg), `container` (mp4, mov
or mkv), `parallel` (cameras encoded at once, bounded by the CPU count;
default the CPU count), `stream` (start while frames are still arriving).

Side effects: writes `<camera>.<container>` into the item's folder (beside the
frames, never inside them) and makes those videos the payload, so the next
steps ship videos, not frames. Frames are checked before ffmpeg starts (each
camera must have frames, numbered without gaps, one resolution, every file a
complete PNG/JPEG) and fed to ffmpeg through a pipe in numeric order, PNG
CRCs checked on the way. ffmpeg runs as a child (argv, no shell) in its own
process group, writes under `.encode/` and the video is renamed into place
only after its frame count (ffprobe, or ffmpeg when ffprobe is missing)
equals the number of frames fed. A failed encode is retried once, then fails
the item. A restart after `kill -9` removes what was half-written and encodes
again the cameras not yet recorded as done in the checkpoint.

With `stream: true` (first step of a marker-ready bundle queue) the step
starts as soon as the episode's folder appears in the inbox: each camera's
ffmpeg starts with its first frame, and frame N+1 is fed once it has landed: a
close-after-write or moved-in event names it, or its content is a complete
image. At the ready marker the final frame list is checked as in batch mode
(gaps, resolutions, damage; errors are reported then, never before the
producer finished) and the encodes end with the last frames. A camera whose
first frames landed out of order is encoded again from its true first frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from spoold.errors import Interrupted, PermanentError, StepError, TransientError
from spoold.handlers.base import ArrivingBundle, Handler, StepContext, StepResult
from spoold.media import (
    ENCODE_TAG_PREFIX,
    FrameError,
    check_png_chunks,
    encoders,
    find_ffmpeg,
    frame_size,
    image_size,
    probe,
)

WORK_DIR = ".encode"
POLL_SECONDS = 0.25
# While frames arrive: how often the folders are listed (events name most frames; listing finds the rest).
LISTING_SECONDS = 1.0
# A feeder waiting for its next frame re-checks this often even without news (an event may be lost).
FRAME_WAIT_SECONDS = 1.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
STDERR_TAIL_CHARS = 2000
_MUXERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska"}
_NUMBER = re.compile(r"(\d+)(?!.*\d)")
_PROGRESS_FRAME = re.compile(rb"frame=(\d+)")
# After `kill -9` of the daemon an orphaned ffmpeg would go on encoding the frames it buffered, into a file
# nobody reads, while the restarted daemon encodes again; where util-linux's setpriv exists, the kernel
# kills it with its parent (preexec_fn cannot do this safely in a threaded daemon).
_SETPRIV = shutil.which("setpriv")
_DEATH_SIGNAL = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    frames: str = "*/*.png"
    fps: float = 30.0
    codec: str = "libx264"
    preset: str | None = None
    crf: int | None = None
    pix_fmt: str = "yuv420p"
    ffmpeg: str = "auto"
    container: Literal["mp4", "mov", "mkv"] = "mp4"
    parallel: int | None = None
    stream: bool = False

    def __post_init__(self) -> None:
        pattern = PurePosixPath(self.frames)
        if pattern.is_absolute() or ".." in pattern.parts or not self.frames.strip():
            raise ValueError("frames must be a relative glob inside the bundle, like '*/*.png'")
        if not 0 < self.fps <= 1000:
            raise ValueError("fps must be between 0 and 1000")
        if self.crf is not None and not 0 <= self.crf <= 63:
            raise ValueError("crf must be between 0 and 63")
        if self.parallel is not None and self.parallel < 1:
            raise ValueError("parallel must be at least 1")
        if self.stream and len(pattern.parts) > 2:
            raise ValueError("with stream: true, frames must be like 'cam_*/*.png' (one level of camera folders) "
                             "or '*.png'")  # fmt: skip

    def settings(self) -> dict[str, object]:
        """The encoder settings, recorded in the result and tagged into each video."""
        return {"codec": self.codec, "preset": self.preset, "crf": self.crf, "pix_fmt": self.pix_fmt, "fps": self.fps}


@dataclasses.dataclass
class Camera:
    name: str
    frames: list[Path]
    width: int
    height: int
    done: int = 0

    def open_stream(self) -> FrameStream:
        stream = FrameStream(os.open(self.frames[0].parent, _DIR_FLAGS))
        stream.finish([p.name for p in self.frames])
        return stream


class Encode(Handler[EncodeOptions]):
    name = "encode"
    Options = EncodeOptions

    @property
    def starts_early(self) -> bool:
        return self.options.stream

    def run(self, ctx: StepContext) -> StepResult:
        if ctx.arriving is None and (len(ctx.payload) != 1 or not ctx.payload[0].is_dir()):
            raise PermanentError("encode needs a bundle: a folder of frames (set `items: bundles` on the queue)")
        ffmpeg = find_ffmpeg(self.options.ffmpeg)
        if self.options.codec not in encoders(ffmpeg):
            raise PermanentError(f"encoder {self.options.codec!r} is not available in {ffmpeg} "
                                 f"(see `{os.path.basename(ffmpeg)} -encoders`)")  # fmt: skip
        work = ctx.item_dir / WORK_DIR
        shutil.rmtree(work, ignore_errors=True)  # whatever a crashed run half-wrote
        work.mkdir()
        early: dict[str, CameraJob] = {}
        try:
            if ctx.arriving is not None:
                try:
                    self._start_while_arriving(ctx, ctx.arriving, ffmpeg, work, early)
                except StepError as exc:
                    # E.g. a frame rewritten after it was closed. Whatever it was, nothing is final before the
                    # marker: encode the whole bundle once it is complete; its checks name what is wrong, if any.
                    ctx.log.warning("encoding while frames arrive failed (%s); encoding once the bundle is whole",
                                    exc)  # fmt: skip
                    for job in early.values():
                        job.abort()
                    early.clear()
                    ctx.arriving.wait_complete()
            cameras = self._plan(ctx)
            self._encode_all(ctx, ffmpeg, cameras, work, early)
        except BaseException:
            for job in early.values():
                job.abort()
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        outputs = [self._output(ctx, c) for c in cameras]
        return StepResult(
            result={
                "outputs": [p.name for p in outputs],
                "cameras": {c.name: {"frames": len(c.frames), "width": c.width, "height": c.height} for c in cameras},
                "encoder": self.options.settings(),
            },
            outputs=outputs,
        )

    def _plan(self, ctx: StepContext) -> list[Camera]:
        return plan_cameras(ctx.payload[0], self.options.frames, ctx.item, self.options.pix_fmt)

    def _output(self, ctx: StepContext, camera: Camera) -> Path:
        return ctx.item_dir / f"{camera.name}.{self.options.container}"

    def _limit(self) -> int:
        return min(os.cpu_count() or 1, self.options.parallel or os.cpu_count() or 1)

    def _start_while_arriving(
        self, ctx: StepContext, arriving: ArrivingBundle, ffmpeg: str, work: Path, jobs: dict[str, CameraJob]
    ) -> None:
        """Start each camera's ffmpeg on its first frames and feed it as frames land, until the ready marker."""
        folders = ArrivingFolders(arriving.root_fd, self.options.frames, ctx.item)
        wake = threading.Event()
        next_listing = next_progress = 0.0
        try:
            while True:
                is_complete = arriving.is_complete()  # read first: what landed before the marker is offered below
                if time.monotonic() >= next_listing and not is_complete:
                    folders.list_all()
                    next_listing = time.monotonic() + LISTING_SECONDS
                folders.offer_landed(arriving.take_landed())
                if is_complete:
                    return
                for name, stream in folders.streams.items():
                    if name not in jobs and len(jobs) < self._limit() and stream.seen():
                        jobs[name] = CameraJob(name, stream, self._argv(ffmpeg), work, wake)
                        jobs[name].start()
                for job in jobs.values():
                    if job.is_finished():
                        self._raise_if_failed(ctx, job)
                        raise TransientError(f"ffmpeg for camera {job.name} ended before the last frame")
                if time.monotonic() >= next_progress:
                    next_progress = time.monotonic() + POLL_SECONDS
                    self._report_arriving(ctx, folders, jobs)
                arriving.wait(POLL_SECONDS)
                ctx.check_stop()
        finally:
            folders.close_unused(jobs)

    @staticmethod
    def _report_arriving(ctx: StepContext, folders: ArrivingFolders, jobs: dict[str, CameraJob]) -> None:
        cameras = {name: {"frames_done": jobs[name].frames_encoded() if name in jobs else 0,
                          "frames_total": stream.seen()} for name, stream in folders.streams.items()}  # fmt: skip
        ctx.progress(sum(c["frames_done"] for c in cameras.values()),
                     sum(c["frames_total"] for c in cameras.values()), unit="frames", cameras=cameras)  # fmt: skip

    def _encode_all(
        self, ctx: StepContext, ffmpeg: str, cameras: list[Camera], work: Path, early: dict[str, CameraJob]
    ) -> None:
        finished: dict[str, int] = ctx.checkpoint.data.setdefault("cameras", {})
        by_name = {c.name: c for c in cameras}
        pending, running = list[Camera](), list[CameraJob]()
        wake = threading.Event()
        for camera in cameras:
            job = early.pop(camera.name, None)
            if finished.get(camera.name) == len(camera.frames) and self._output(ctx, camera).exists():
                camera.done = len(camera.frames)
            elif job is not None and job.stream.finish([p.name for p in camera.frames]):
                job.wake = wake
                running.append(job)
                continue
            else:
                pending.append(camera)
            if job is not None:
                job.abort()  # its first frames landed out of order: encode again from the true first frame
        for job in early.values():
            job.abort()
        early.clear()
        total = sum(len(c.frames) for c in cameras)
        try:
            while pending or running:
                while pending and len(running) < self._limit():
                    camera = pending.pop(0)
                    job = CameraJob(camera.name, camera.open_stream(), self._argv(ffmpeg), work, wake)
                    job.start()
                    running.append(job)
                wake.wait(POLL_SECONDS)
                wake.clear()
                ctx.check_stop()
                for job in list(running):
                    by_name[job.name].done = job.frames_encoded()
                    if not job.is_finished():
                        continue
                    running.remove(job)
                    self._finish(ctx, job, by_name[job.name])
                ctx.progress(sum(c.done for c in cameras), total, unit="frames",
                             cameras={c.name: {"frames_done": c.done, "frames_total": len(c.frames)} for c in cameras})
        except (Interrupted, StepError, OSError):
            for job in running:
                job.abort()
            raise

    def _argv(self, ffmpeg: str) -> list[str]:
        options = self.options
        argv = [ffmpeg, "-hide_banner", "-v", "error", "-nostats", "-f", "image2pipe", "-framerate", f"{options.fps:g}"]
        # ffmpeg otherwise reads 5 MB of input (hundreds of small frames) before encoding any: the codec is
        # given, so nothing needs probing, and a streamed camera starts encoding with its first frame.
        argv += ["-probesize", "32", "-analyzeduration", "0"]
        argv += ["-c:v", "mjpeg" if options.frames.lower().endswith((".jpg", ".jpeg")) else "png", "-i", "pipe:0"]
        argv += ["-c:v", options.codec]
        if options.preset is not None:
            argv += ["-preset", options.preset]
        if options.crf is not None:
            argv += ["-crf", str(options.crf)]
        tag = ENCODE_TAG_PREFIX + json.dumps(options.settings(), separators=(",", ":"))
        argv += ["-pix_fmt", options.pix_fmt, "-metadata", f"comment={tag}", "-f", _MUXERS[options.container], "-y"]
        return argv

    def _raise_if_failed(self, ctx: StepContext, job: CameraJob) -> None:
        if job.error is not None:
            raise job.error
        if job.returncode != 0:
            ctx.log.error("ffmpeg for %s failed (%s):\n%s", job.name, _describe(job.returncode), job.stderr_tail)
            self._failed(ctx, f"ffmpeg failed on camera {job.name} ({_describe(job.returncode)}): "
                              f"{job.stderr_tail[-500:] or 'no message'}", job.returncode < 0)  # fmt: skip

    def _finish(self, ctx: StepContext, job: CameraJob, camera: Camera) -> None:
        """Check a camera's finished encode and move the video into place, or raise."""
        self._raise_if_failed(ctx, job)
        facts = probe(job.output, self.options.ffmpeg)
        if facts["frames"] != len(camera.frames):
            job.output.unlink(missing_ok=True)
            self._failed(ctx, f"the video of camera {camera.name} has {facts['frames']} frames, "
                              f"expected {len(camera.frames)}", False)  # fmt: skip
        os.replace(job.output, self._output(ctx, camera))
        ctx.checkpoint.data.setdefault("cameras", {})[camera.name] = len(camera.frames)
        ctx.checkpoint.save()
        camera.done = len(camera.frames)

    @staticmethod
    def _failed(ctx: StepContext, message: str, is_always_transient: bool) -> None:
        # Transient once (a full disk or a killed ffmpeg pass), then permanent: the same frames fail the same way.
        failures = int(ctx.checkpoint.data.get("failures", 0)) + 1
        ctx.checkpoint.data["failures"] = failures
        ctx.checkpoint.save()
        if is_always_transient or failures == 1 or "No space left" in message:
            raise TransientError(message)
        raise PermanentError(message)


class ArrivingFolders:
    """The camera folders of a bundle still arriving, each with the frames seen so far (read through fds)."""

    def __init__(self, root_fd: int, pattern: str, item: str) -> None:
        parts = PurePosixPath(pattern).parts
        self.root_fd = root_fd
        self.folder_glob = parts[0] if len(parts) == 2 else None
        self.frame_glob = parts[-1]
        self.item = item
        self.streams: dict[str, FrameStream] = {}

    def list_all(self) -> None:
        folders = [f for f in os.listdir(self.root_fd) if self._is_folder(f)] if self.folder_glob else [""]
        for folder in sorted(folders):
            stream = self._stream(folder)
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.offer(self._frames(os.listdir(stream.dir_fd)), is_landed=False)

    def offer_landed(self, paths: list[str]) -> None:
        for relative in paths:
            parts = relative.split("/")
            if len(parts) != (2 if self.folder_glob else 1) or (self.folder_glob and not self._is_folder(parts[0])):
                continue
            stream = self._stream(parts[0] if self.folder_glob else "")
            if stream is not None:
                stream.offer(self._frames(parts[-1:]), is_landed=True)

    def close_unused(self, jobs: dict[str, CameraJob]) -> None:
        for name, stream in self.streams.items():
            if name not in jobs:
                stream.close()

    def _is_folder(self, name: str) -> bool:
        return not name.startswith(".") and fnmatchcase(name, self.folder_glob or "")

    def _frames(self, names: Iterable[str]) -> list[str]:
        return [n for n in names if not n.startswith(".") and fnmatchcase(n, self.frame_glob)]

    def _stream(self, folder: str) -> FrameStream | None:
        name = folder or self.item
        if name not in self.streams:
            try:
                self.streams[name] = FrameStream(os.open(folder or ".", _DIR_FLAGS, dir_fd=self.root_fd))
            except OSError:
                return None  # not a folder (a file named like one), or gone
        return self.streams[name]


class FrameStream:
    """One camera's frames in numeric order for ffmpeg's pipe; in stream mode they may still be landing.

    The step's thread offers frame names as it sees them (`offer`) and, once the bundle is whole, the checked
    final list (`finish`); the camera's feeder thread takes them in order (`next_frame`). A frame named by a
    close-after-write or moved-in event, or any frame of the final list, must be a complete image; one only
    seen in a listing may still be being written, and is taken once its content is complete.
    """

    def __init__(self, dir_fd: int) -> None:
        self.dir_fd = dir_fd
        self.fed: list[str] = []
        self._taking: str | None = None
        self._names: dict[int, str] = {}
        self._landed: set[str] = set()
        self._final: list[str] | None = None
        self._size: tuple[tuple[int, int], str] | None = None
        self._generation = 0
        self._is_stopped = False
        self._is_closed = False
        self._changed = threading.Condition()

    def seen(self) -> int:
        return len(self._names) if self._final is None else len(self._final)

    def offer(self, names: Iterable[str], *, is_landed: bool) -> None:
        with self._changed:
            for name in names:
                number = frame_number(name)
                if number is not None:
                    self._names.setdefault(number, name)
                    if is_landed:
                        self._landed.add(name)
            self._generation += 1
            self._changed.notify_all()

    def finish(self, ordered: list[str]) -> bool:
        """Make `ordered` the whole list; False if the frames already fed are not its beginning."""
        with self._changed:
            taken = [*self.fed, *([self._taking] if self._taking else [])]
            if ordered[: len(taken)] != taken:
                return False
            self._final = ordered
            self._generation += 1
            self._changed.notify_all()
            return True

    def stop(self) -> None:
        with self._changed:
            self._is_stopped = True
            self._changed.notify_all()

    def close(self) -> None:
        with self._changed:
            if not self._is_closed:
                self._is_closed = True
                os.close(self.dir_fd)

    def next_frame(self) -> bytes | None:
        """The next frame's bytes, waiting for it to land; None after the last one (or when stopped)."""
        while True:
            with self._changed:
                if self._is_stopped:
                    return None
                name, is_sure = self._next_name()
                if name is None:
                    if self._final is not None:
                        return None
                    self._changed.wait(FRAME_WAIT_SECONDS)
                    continue
                self._taking, generation = name, self._generation
            try:
                data = self._read(name, is_sure)
            finally:
                with self._changed:
                    self._taking = None
            with self._changed:
                if data is not None:
                    self.fed.append(name)
                    return data
                if self._generation == generation:
                    self._changed.wait(FRAME_WAIT_SECONDS)

    def _next_name(self) -> tuple[str | None, bool]:
        if self._final is not None:
            index = len(self.fed)
            return (self._final[index] if index < len(self._final) else None), True
        if self.fed:
            number: int | None = frame_number(self.fed[-1])
            number = None if number is None else number + 1
        else:
            number = min(self._names, default=None)
        name = self._names.get(number) if number is not None else None
        return name, name in self._landed

    def _read(self, name: str, is_sure: bool) -> bytes | None:
        """The frame's bytes if it is a complete image; None if it may still be being written."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.dir_fd)
        except OSError as exc:
            if is_sure:
                raise FrameError(f"{name}: cannot be read ({exc.strerror})") from None
            return None
        with open(fd, "rb") as stream:
            data = stream.read()
        try:
            if data.startswith(b"\x89PNG"):
                check_png_chunks(name, data)
            size = image_size(name, data[: 64 * 1024], data[-12:])
        except FrameError:
            if is_sure:
                raise
            return None
        if self._size is None:
            self._size = (size, name)
        elif size != self._size[0]:
            (width, height), first = self._size
            raise FrameError(f"mixed resolutions: {first} is {width}x{height} but {name} is {size[0]}x{size[1]}")
        return data


class CameraJob:
    """One ffmpeg child encoding one camera; a worker thread feeds it the frames in order."""

    def __init__(self, name: str, stream: FrameStream, argv: list[str], work: Path, wake: threading.Event) -> None:
        self.name = name
        self.stream = stream
        self.output = work / f"{name}.video.tmp"
        self.progress_path = work / f"{name}.progress"
        self.argv = [*_DEATH_SIGNAL, argv[0], "-progress", str(self.progress_path), *argv[1:], str(self.output)]
        self.wake = wake
        self.error: StepError | None = None
        self.returncode = 0
        self.stderr_tail = ""
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the worker
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._work, name=f"encode-{name}", daemon=True)

    def start(self) -> None:
        try:
            self._process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=self._stderr, start_new_session=True)  # fmt: skip
        except OSError as exc:
            self._stderr.close()
            self.stream.close()
            raise PermanentError(f"cannot run {self.argv[len(_DEATH_SIGNAL)]}: {exc.strerror}") from None
        self._thread.start()

    def is_finished(self) -> bool:
        return not self._thread.is_alive()

    def frames_encoded(self) -> int:
        try:
            with open(self.progress_path, "rb") as stream:
                stream.seek(max(os.fstat(stream.fileno()).st_size - 1024, 0))
                found = _PROGRESS_FRAME.findall(stream.read())
        except FileNotFoundError:
            return 0
        return int(found[-1]) if found else 0

    def abort(self) -> None:
        """Stop feeding and kill ffmpeg's process group; returns once the worker has finished."""
        self.stream.stop()
        if self._process is not None and not self.is_finished():
            _kill(self._process)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            while (data := self.stream.next_frame()) is not None:
                process.stdin.write(data)
        except FrameError as exc:
            self.error = FrameError(f"{self.name}/{exc}")
            _kill(process)
        except (BrokenPipeError, OSError):
            pass  # ffmpeg stopped reading: its exit code and stderr say why
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()
            self.returncode = process.wait()
            self._stderr.seek(0)
            self.stderr_tail = self._stderr.read().decode(errors="replace").strip()[-STDERR_TAIL_CHARS:]
            self._stderr.close()
            self.stream.close()
            self.wake.set()


def plan_cameras(root: Path, pattern: str, item: str, pix_fmt: str) -> list[Camera]:
    """The cameras of a bundle with their frames in numeric order; PermanentError on anything odd."""
    groups: dict[Path, list[Path]] = {}
    for path in sorted(root.glob(pattern)):
        if path.is_file() and not path.is_symlink() and not path.name.startswith("."):
            groups.setdefault(path.parent, []).append(path)
    parent_pattern = str(PurePosixPath(pattern).parent)
    if parent_pattern != ".":
        for folder in sorted(root.glob(parent_pattern)):
            if folder.is_dir() and not folder.name.startswith(".") and folder not in groups:
                raise PermanentError(f"camera folder {folder.relative_to(root)} has no frames matching "
                                     f"{PurePosixPath(pattern).name!r}")  # fmt: skip
    if not groups:
        raise PermanentError(f"no frames matching {pattern!r} in the bundle")
    cameras = []
    for folder, frames in sorted(groups.items()):
        name = "_".join(folder.relative_to(root).parts) or item
        cameras.append(_camera(name, frames, pix_fmt))
    return cameras


def frame_number(name: str) -> int | None:
    match = _NUMBER.search(PurePosixPath(name).stem)
    return int(match.group(1)) if match else None


def _camera(name: str, frames: list[Path], pix_fmt: str) -> Camera:
    numbered: dict[int, Path] = {}
    for path in frames:
        number = frame_number(path.name)
        if number is None:
            raise PermanentError(f"{name}/{path.name} has no frame number in its name")
        if number in numbered:
            raise PermanentError(f"{name}: {numbered[number].name} and {path.name} have the same frame number")
        numbered[number] = path
    numbers = sorted(numbered)
    gaps = [(a, b) for a, b in itertools.pairwise(numbers) if b != a + 1]
    if gaps:
        shown = ", ".join(f"{numbered[a].name} -> {numbered[b].name} ({b - a - 1} missing)" for a, b in gaps[:3])
        raise PermanentError(f"{name}: gap in the frame numbering: {shown}")
    ordered = [numbered[n] for n in numbers]
    sizes: dict[tuple[int, int], Path] = {}
    for path in ordered:
        try:
            size = frame_size(path)
        except FrameError as exc:
            raise FrameError(f"{name}/{exc}") from None
        sizes.setdefault(size, path)
        if len(sizes) > 1:
            (a, first), (b, other) = list(sizes.items())[:2]
            raise PermanentError(f"{name}: mixed resolutions: {first.name} is {a[0]}x{a[1]} "
                                 f"but {other.name} is {b[0]}x{b[1]}")  # fmt: skip
    width, height = next(iter(sizes))
    if ("420" in pix_fmt and (width % 2 or height % 2)) or ("422" in pix_fmt and width % 2):
        raise PermanentError(f"{name}: {width}x{height} frames cannot be encoded as {pix_fmt} (odd size)")
    return Camera(name, ordered, width, height)


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except (ProcessLookupError, PermissionError):
        pass
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"
