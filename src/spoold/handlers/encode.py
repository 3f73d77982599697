"""encode: folders of PNG/JPEG frames to one video per camera, with ffmpeg.

Options: `frames` (glob inside the bundle, default `*/*.png`; each distinct
parent folder is one camera), `fps` (default 30), `codec` (default libx264;
any encoder of that ffmpeg, e.g. h264_v4l2m2m, h264_nvenc, libx265),
`preset`, `crf`, `pix_fmt` (default yuv420p), `ffmpeg` (path or `auto`: the
system ffmpeg, else the one bundled by imageio-ffmpeg), `container` (mp4, mov
or mkv), `parallel` (cameras encoded at once, bounded by the CPU count;
default the CPU count), `stream` (accepted; see below).

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

`stream: true` is accepted and, in this version, encodes like batch mode after
the ready marker. Starting earlier needs the core to hand the step the growing
inbox folder before the claim (a handler flag such as `starts_early`, and a
context call saying whether the ready marker has arrived); the pipe feeder here
would then wait for frame N+1 to land instead of reading a finished list.
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
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from spoold.errors import Interrupted, PermanentError, StepError, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.media import ENCODE_TAG_PREFIX, FrameError, check_png_chunks, encoders, find_ffmpeg, frame_size, probe

WORK_DIR = ".encode"
POLL_SECONDS = 0.25
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


class Encode(Handler[EncodeOptions]):
    name = "encode"
    Options = EncodeOptions

    def run(self, ctx: StepContext) -> StepResult:
        if len(ctx.payload) != 1 or not ctx.payload[0].is_dir():
            raise PermanentError("encode needs a bundle: a folder of frames (set `items: bundles` on the queue)")
        ffmpeg = find_ffmpeg(self.options.ffmpeg)
        if self.options.codec not in encoders(ffmpeg):
            raise PermanentError(f"encoder {self.options.codec!r} is not available in {ffmpeg} "
                                 f"(see `{os.path.basename(ffmpeg)} -encoders`)")  # fmt: skip
        cameras = plan_cameras(ctx.payload[0], self.options.frames, ctx.item, self.options.pix_fmt)
        work = ctx.item_dir / WORK_DIR
        shutil.rmtree(work, ignore_errors=True)  # whatever a crashed run half-wrote
        work.mkdir()
        finished: dict[str, int] = ctx.checkpoint.data.setdefault("cameras", {})
        todo = [c for c in cameras if not (finished.get(c.name) == len(c.frames) and self._output(ctx, c).exists())]
        for camera in cameras:
            if camera not in todo:
                camera.done = len(camera.frames)
        try:
            self._encode_all(ctx, ffmpeg, cameras, todo, work)
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

    def _output(self, ctx: StepContext, camera: Camera) -> Path:
        return ctx.item_dir / f"{camera.name}.{self.options.container}"

    def _encode_all(self, ctx: StepContext, ffmpeg: str, cameras: list[Camera], todo: list[Camera], work: Path) -> None:
        limit = min(os.cpu_count() or 1, self.options.parallel or os.cpu_count() or 1)
        wake = threading.Event()
        pending, running = list(todo), list[CameraJob]()
        total = sum(len(c.frames) for c in cameras)
        try:
            while pending or running:
                while pending and len(running) < limit:
                    job = CameraJob(pending.pop(0), self._argv(ffmpeg), work, wake)
                    job.start()
                    running.append(job)
                wake.wait(POLL_SECONDS)
                wake.clear()
                ctx.check_stop()
                for job in list(running):
                    job.camera.done = job.frames_encoded()
                    if not job.is_finished():
                        continue
                    running.remove(job)
                    self._finish(ctx, job)
                ctx.progress(sum(c.done for c in cameras), total, unit="frames",
                             cameras={c.name: {"frames_done": c.done, "frames_total": len(c.frames)} for c in cameras})
        except (Interrupted, StepError, OSError):
            for job in running:
                job.abort()
            raise

    def _argv(self, ffmpeg: str) -> list[str]:
        options = self.options
        argv = [ffmpeg, "-hide_banner", "-v", "error", "-nostats", "-f", "image2pipe", "-framerate", f"{options.fps:g}"]
        argv += ["-c:v", "mjpeg" if options.frames.lower().endswith((".jpg", ".jpeg")) else "png", "-i", "pipe:0"]
        argv += ["-c:v", options.codec]
        if options.preset is not None:
            argv += ["-preset", options.preset]
        if options.crf is not None:
            argv += ["-crf", str(options.crf)]
        tag = ENCODE_TAG_PREFIX + json.dumps(options.settings(), separators=(",", ":"))
        argv += ["-pix_fmt", options.pix_fmt, "-metadata", f"comment={tag}", "-f", _MUXERS[options.container], "-y"]
        return argv

    def _finish(self, ctx: StepContext, job: CameraJob) -> None:
        """Check a camera's finished encode and move the video into place, or raise."""
        camera = job.camera
        if job.error is not None:
            raise job.error
        if job.returncode != 0:
            ctx.log.error("ffmpeg for %s failed (%s):\n%s", camera.name, _describe(job.returncode), job.stderr_tail)
            self._failed(ctx, f"ffmpeg failed on camera {camera.name} ({_describe(job.returncode)}): "
                              f"{job.stderr_tail[-500:] or 'no message'}", job.returncode < 0)  # fmt: skip
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


class CameraJob:
    """One ffmpeg child encoding one camera; a worker thread feeds it the frames in order."""

    def __init__(self, camera: Camera, argv: list[str], work: Path, wake: threading.Event) -> None:
        self.camera = camera
        self.output = work / f"{camera.name}.video.tmp"
        self.progress_path = work / f"{camera.name}.progress"
        self.argv = [*_DEATH_SIGNAL, argv[0], "-progress", str(self.progress_path), *argv[1:], str(self.output)]
        self.wake = wake
        self.error: StepError | None = None
        self.returncode = 0
        self.stderr_tail = ""
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the worker
        self._aborted = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._work, name=f"encode-{camera.name}", daemon=True)

    def start(self) -> None:
        try:
            self._process = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                             stderr=self._stderr, start_new_session=True)  # fmt: skip
        except OSError as exc:
            self._stderr.close()
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
        self._aborted.set()
        if self._process is not None:
            _kill(self._process)
        self._thread.join(timeout=10)

    def _work(self) -> None:
        process = self._process
        assert process is not None and process.stdin is not None
        try:
            self._feed(process.stdin)
        except FrameError as exc:
            self.error = FrameError(f"{self.camera.name}/{exc}")
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
            self.wake.set()

    def _feed(self, stdin: IO[bytes]) -> None:
        is_png = self.camera.frames[0].suffix.lower() == ".png"
        for path in self.camera.frames:
            if self._aborted.is_set():
                return
            data = path.read_bytes()
            if is_png:
                check_png_chunks(path.name, data)
            stdin.write(data)


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


def _camera(name: str, frames: list[Path], pix_fmt: str) -> Camera:
    numbered: dict[int, Path] = {}
    for path in frames:
        match = _NUMBER.search(path.stem)
        if match is None:
            raise PermanentError(f"{name}/{path.name} has no frame number in its name")
        number = int(match.group(1))
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
