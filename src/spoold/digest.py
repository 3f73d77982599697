"""Several digests in one read pass: sha256, xxh3_128, xxh64, md5."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import xxhash

Algorithm = Literal["sha256", "xxh3_128", "xxh64", "md5"]
ALGORITHMS: tuple[Algorithm, ...] = ("sha256", "xxh3_128", "xxh64", "md5")
SMALL_BUFFER_BYTES = 64 << 10
CHUNK_BYTES = 4 << 20

_FACTORIES: dict[str, Callable[[], Any]] = {
    "sha256": hashlib.sha256,
    "md5": hashlib.md5,
    "xxh3_128": xxhash.xxh3_128,
    "xxh64": xxhash.xxh64,
}


class MultiHasher:
    """Feeds each chunk to every digest. With two or more, the slowest runs on a helper thread
    (hashlib and xxhash release the GIL), so sha256 + xxh3_128 cost about what sha256 alone does."""

    def __init__(self, algorithms: Iterable[str]) -> None:
        self.hashers = {name: _FACTORIES[name]() for name in dict.fromkeys(algorithms)}
        self._pool = ThreadPoolExecutor(max_workers=1) if len(self.hashers) > 1 else None
        self._primary = next(iter(self.hashers.values()), None)

    def update(self, chunk: bytes | memoryview) -> None:
        if self._pool is None:
            for hasher in self.hashers.values():
                hasher.update(chunk)
            return
        first, *rest = self.hashers.values()
        pending = self._pool.submit(first.update, chunk)
        for hasher in rest:
            hasher.update(chunk)
        pending.result()

    def hexdigests(self) -> dict[str, str]:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        return {name: hasher.hexdigest() for name, hasher in self.hashers.items()}


def hash_file(
    path: Path, algorithms: Iterable[str], on_bytes: Callable[[int], None] | None = None
) -> dict[str, str]:
    """Digests of the file at `path`, read once; `on_bytes(n)` after each chunk."""
    hasher = MultiHasher(algorithms)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        # Buffers as large as the file (or CHUNK_BYTES): zeroing two full-size chunks for a 1 KiB file was a
        # fifth of the daemon's time in a burst of small items. A file that grows meanwhile is read in more turns.
        size = min(CHUNK_BYTES, max(os.fstat(fd).st_size + 1, SMALL_BUFFER_BYTES))
        buffers = [bytearray(size), bytearray(size)]
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        with open(fd, "rb", buffering=0, closefd=False) as stream:
            turn = 0
            while True:
                view = memoryview(buffers[turn])
                n = stream.readinto(view)
                if not n:
                    break
                hasher.update(view[:n])
                if on_bytes is not None:
                    on_bytes(n)
                turn ^= 1
    finally:
        os.close(fd)
    return hasher.hexdigests()
