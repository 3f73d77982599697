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
ffmpeg starts with its first frame, and frame N+1 is fed once it has landed
(see `spoold.frames`). At the ready marker the final frame list is checked as
in batch mode (gaps, resolutions, damage; errors are reported then, never
before the producer finished) and the encodes end with the last frames. A
camera whose first frames landed out of order is encoded again from its true
first frame; if encoding while frames arrived failed, the whole bundle is
encoded once it is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import IO, Literal

from spoold.children import DEATH_SIGNAL
from spoold.errors import Interrupted, PermanentError, StepError, TransientError
from spoold.frames import LISTING_SECONDS, ArrivingFolders, Camera, FrameStream, plan_cameras
from spoold.handlers.base import ArrivingBundle, Handler, StepContext, StepResult
from spoold.media import ENCODE_TAG_PREFIX, FrameError, encoders, find_ffmpeg, probe

WORK_DIR = ".encode"
POLL_SECONDS = 0.25
STDERR_TAIL_CHARS = 2000
_MUXERS = {"mp4": "mp4", "mov": "mov", "mkv": "matroska"}
_PROGRESS_FRAME = re.compile(rb"frame=(\d+)")


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


class CameraJob:
    """One ffmpeg child encoding one camera; a worker thread feeds it the frames in order."""

    def __init__(self, name: str, stream: FrameStream, argv: list[str], work: Path, wake: threading.Event) -> None:
        self.name = name
        self.stream = stream
        self.output = work / f"{name}.video.tmp"
        self.progress_path = work / f"{name}.progress"
        self.argv = [*DEATH_SIGNAL, argv[0], "-progress", str(self.progress_path), *argv[1:], str(self.output)]
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
            raise PermanentError(f"cannot run {self.argv[len(DEATH_SIGNAL)]}: {exc.strerror}") from None
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
