"""Benchmark: spoold's encode step against the same ffmpeg command run directly, in the same run.

An episode of 2 cameras x 300 PNG frames at 1280x720 (BENCH_ENCODE_FRAMES,
BENCH_ENCODE_SIZE and BENCH_ENCODE_CAMERAS shrink or grow it) is encoded
with libx264 preset fast crf 23:
- directly: `ffmpeg -framerate 30 -i cam/frame_%06d.png ...`, one camera after the other;
- by spoold in batch mode: the daemon as a subprocess, timed from the ready marker to the sidecar saying done;
- by spoold in stream mode (`stream: true`): a producer writes the frames into the inbox at 30 fps per camera,
  then the marker; timed from the marker to done (target < 3 s).
Prints the medians of 3 interleaved runs (BENCH_ENCODE_RUNS), the batch ratio (target <= 1.05) against
ffmpeg one camera after the other and all cameras at once, and the daemon's peak RSS (VmHWM, ffmpeg
excluded; target < 80 MiB). Stream mode cannot beat the encoder: when ffmpeg encodes slower than the
frames arrive (a small machine), the backlog at the marker is encoded after it; the bench prints that
floor, from the direct run.

Run: python -m bench.encode
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FPS = 30
ENCODE = ["-c:v", "libx264", "-preset", "fast", "-crf", "23", "-pix_fmt", "yuv420p"]
DEADLINE_SECONDS = 600.0


def make_episode(root: Path, cameras: int, frames: int, size: str) -> Path:
    episode = root / "episode_000001"
    for index in range(cameras):
        folder = episode / f"cam_{index}"
        folder.mkdir(parents=True)
        # testsrc2 moves and has colour gradients: closer to a camera than testsrc's flat bars.
        subprocess.run(["ffmpeg", "-v", "error", "-f", "lavfi", "-i", f"testsrc2=size={size}:rate={FPS}",
                        "-frames:v", str(frames), "-start_number", "1", str(folder / "frame_%06d.png")],
                       check=True)  # fmt: skip
    return episode


def direct(episode: Path, out: Path, *, is_parallel: bool = False) -> float:
    """ffmpeg itself: one camera after the other, or (`is_parallel`) all cameras at once, as spoold runs them."""
    out.mkdir()
    start = time.monotonic()
    commands = [["ffmpeg", "-v", "error", "-y", "-framerate", str(FPS), "-i", str(camera / "frame_%06d.png"),
                 *ENCODE, str(out / f"{camera.name}.mp4")] for camera in sorted(episode.iterdir())]  # fmt: skip
    if is_parallel:
        for process in [subprocess.Popen(command) for command in commands]:
            if process.wait() != 0:
                raise SystemExit("ffmpeg failed")
    else:
        for command in commands:
            subprocess.run(command, check=True)
    return time.monotonic() - start


def through_spoold(episode: Path, root: Path, stream: bool, run: int = 0) -> tuple[float, int]:
    spool = root / (f"spool-stream-{run}" if stream else f"spool-{run}")
    config = root / "spoold.yaml"
    config.write_text(
        f"spool: {spool}\nqueues:\n  episodes:\n    items: bundles\n    chain:\n"
        f"      - encode: {{fps: {FPS}, codec: libx264, preset: fast, crf: 23, stream: {str(stream).lower()}}}\n"
    )
    log = open(root / "daemon.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen([sys.executable, "-m", "spoold", "run", "-c", str(config)], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait(lambda: _json(spool / "health.json").get("pid") == daemon.pid and _json(spool / "health.json")["ready"])
        if stream:
            record(episode, spool / "episodes" / "inbox" / episode.name)
        else:
            staged = spool / "episodes" / "inbox" / f".{episode.name}"
            shutil.copytree(episode, staged, copy_function=os.link)
            staged.rename(staged.with_name(episode.name))
        start = time.monotonic()
        (spool / "episodes" / "inbox" / f"{episode.name}.ready").write_text("{}")
        status = spool / "episodes" / "status" / f"{episode.name}.json"
        _wait(lambda: _json(status).get("state") in ("done", "failed"))
        elapsed = time.monotonic() - start
        if _json(status)["state"] != "done":
            raise SystemExit(f"spoold failed: {_json(status)['error']}")
        peak_kib = _peak_rss_kib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        log.close()
    return elapsed, peak_kib


def record(episode: Path, target: Path) -> None:
    """Write the episode's frames as a recorder would: every camera's next frame each 1/FPS s."""
    cameras = sorted(episode.iterdir())
    for camera in cameras:
        (target / camera.name).mkdir(parents=True)
    frames = sorted(p.name for p in cameras[0].iterdir())
    start = time.monotonic()
    for index, name in enumerate(frames):
        for camera in cameras:
            shutil.copyfile(camera / name, target / camera.name / name)
        time.sleep(max(0.0, start + (index + 1) / FPS - time.monotonic()))


def _json(path: Path) -> dict[str, object]:
    try:
        value = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _wait(predicate: object) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("benchmark timed out")
        time.sleep(0.01)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    frames = int(os.environ.get("BENCH_ENCODE_FRAMES", "300"))
    size = os.environ.get("BENCH_ENCODE_SIZE", "1280x720")
    cameras = int(os.environ.get("BENCH_ENCODE_CAMERAS", "2"))
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is not installed")
    with tempfile.TemporaryDirectory(prefix="spoold-bench-") as tmp:
        root = Path(tmp)
        episode = make_episode(root / "source", cameras, frames, size)
        print(f"episode: {cameras} cameras x {frames} frames at {size}, libx264 preset fast crf 23, "
              f"{os.cpu_count()} CPUs")  # fmt: skip
        runs = int(os.environ.get("BENCH_ENCODE_RUNS", "3"))
        sequential, parallel, batch, peaks = [], [], [], []
        for run in range(runs):  # interleaved, so a slower stretch of the machine hits all three alike
            sequential.append(direct(episode, root / f"direct-{run}"))
            parallel.append(direct(episode, root / f"parallel-{run}", is_parallel=True))
            seconds, peak = through_spoold(episode, root, stream=False, run=run)
            batch.append(seconds)
            peaks.append(peak)
        direct_seconds, parallel_seconds = statistics.median(sequential), statistics.median(parallel)
        spoold_seconds = statistics.median(batch)
        print(f"median of {runs} interleaved runs:")
        print(f"ffmpeg directly, one camera after the other: {direct_seconds:.2f} s")
        print(f"ffmpeg directly, every camera at once:       {parallel_seconds:.2f} s")
        print(f"spoold batch, ready marker -> done:         {spoold_seconds:.2f} s")
        print(f"ratio spoold / direct: {spoold_seconds / direct_seconds:.2f} one after the other, "
              f"{spoold_seconds / parallel_seconds:.2f} at once (target <= 1.05)")  # fmt: skip
        print(f"daemon peak RSS (VmHWM, ffmpeg excluded): {max(peaks) / 1024:.1f} MiB (target < 80 MiB)")
        stream_seconds, stream_kib = through_spoold(episode, root, stream=True)
        arriving = frames / FPS
        encoded_fps = cameras * frames / direct_seconds
        floor = max(0.0, cameras * frames - encoded_fps * arriving) / encoded_fps
        print(f"spoold stream, frames at {FPS} fps per camera for {arriving:.1f} s, ready marker -> done: "
              f"{stream_seconds:.2f} s (target < 3 s)")  # fmt: skip
        print(f"  this machine encodes {encoded_fps:.0f} frames/s, {cameras * FPS} arrive per second: "
              f"the backlog at the marker alone takes {floor:.2f} s")  # fmt: skip
        print(f"  daemon peak RSS (VmHWM, ffmpeg excluded): {stream_kib / 1024:.1f} MiB (target < 80 MiB)")


if __name__ == "__main__":
    main()
