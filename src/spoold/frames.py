"""The frames of a bundle: which make up each camera, and feeding them to ffmpeg in order as they land.

`plan_cameras` reads a complete bundle (numbering without gaps, one resolution,
complete PNG/JPEG files). `ArrivingFolders` and `FrameStream` serve a bundle
still being written (`encode: {stream: true}`): folders and frames are found by
close-after-write/moved-in events and by listing, read through directory
descriptors (the folder may be renamed into work/ meanwhile), and a frame seen
only in a listing is taken once its content is a complete image.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import stat
import threading
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

from spoold.errors import PermanentError
from spoold.fsio import describe_type
from spoold.media import FrameError, check_png_chunks, frame_size, image_size

# While frames arrive: how often the folders are listed (events name most frames; listing finds the rest).
LISTING_SECONDS = 1.0
# A feeder waiting for its next frame re-checks this often even without news (an event may be lost).
FRAME_WAIT_SECONDS = 1.0
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Non-blocking: a FIFO named like a frame, dropped while the bundle still arrives, is refused, never waited on.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Far above any real frame (an 8K 16-bit PNG is about 200 MB); a larger "frame" is not read into memory.
MAX_FRAME_BYTES = 512 * 1024 * 1024
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


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

    def close_unused(self, used: Iterable[str]) -> None:
        for name, stream in self.streams.items():
            if name not in used:
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
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise FrameError(f"{name} is {describe_type(info.st_mode)}; frames must be regular files")
            if info.st_size > MAX_FRAME_BYTES:
                raise FrameError(f"{name} is {info.st_size} bytes, more than a frame can be ({MAX_FRAME_BYTES})")
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
