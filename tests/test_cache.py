"""spoold.cache on a real folder: hits by hard link, LRU eviction, corrupted entries never served, crash leftovers."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold.cache import Cache, content_key
from tests.conftest import wait_for

KiB = 1 << 10


class Landing:
    """A folder open as a descriptor, as the S3 download hands it to the cache."""

    def __init__(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def write(self, name: str, data: bytes) -> tuple[str, str]:
        """A downloaded file: (its cache key, its sha256)."""
        (self.path / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        key = content_key(digest, None, len(data))
        assert key is not None
        return key, digest


@pytest.fixture
def landing(tmp_path: Path) -> Iterator[Landing]:
    made = Landing(tmp_path / "landing")
    yield made
    os.close(made.fd)


def test_insert_then_serve_is_a_hard_link_of_the_same_bytes(tmp_path: Path, landing: Landing) -> None:
    cache = Cache(tmp_path / "cache", 1 << 20)
    data = os.urandom(10 * KiB)
    key, digest = landing.write("a.bin", data)
    assert not cache.serve(key, landing.fd, "b.bin"), "nothing is cached yet"
    cache.insert(key, landing.fd, "a.bin", digest, len(data))
    (landing.path / "b.bin").write_bytes(b"a partial download from an earlier attempt")
    assert cache.serve(key, landing.fd, "b.bin")
    assert (landing.path / "b.bin").read_bytes() == data
    assert (landing.path / "b.bin").stat().st_ino == (tmp_path / "cache" / key).stat().st_ino
    assert cache.entries() == [(key, len(data))]


def test_least_recently_used_goes_first(tmp_path: Path, landing: Landing) -> None:
    cache = Cache(tmp_path / "cache", 25 * KiB)
    keys = {}
    for name in ("a", "b"):
        keys[name], digest = landing.write(name, os.urandom(10 * KiB))
        cache.insert(keys[name], landing.fd, name, digest, 10 * KiB)
    assert cache.serve(keys["a"], landing.fd, "a-again")  # a is now more recent than b
    keys["c"], digest = landing.write("c", os.urandom(10 * KiB))
    cache.insert(keys["c"], landing.fd, "c", digest, 10 * KiB)
    assert [k for k, _ in cache.entries()] == [keys["c"], keys["a"]]
    assert not (tmp_path / "cache" / keys["b"]).exists()
    assert (landing.path / "b").exists(), "eviction drops the cache's link only, never the landed file"


def test_an_object_larger_than_the_cache_is_not_cached(tmp_path: Path, landing: Landing) -> None:
    cache = Cache(tmp_path / "cache", 5 * KiB)
    key, digest = landing.write("big", os.urandom(6 * KiB))
    cache.insert(key, landing.fd, "big", digest, 6 * KiB)
    assert cache.entries() == []


def test_an_entry_whose_bytes_changed_is_dropped_not_served(tmp_path: Path, landing: Landing) -> None:
    cache = Cache(tmp_path / "cache", 1 << 20)
    data = os.urandom(10 * KiB)
    key, digest = landing.write("a", data)
    cache.insert(key, landing.fd, "a", digest, len(data))
    entry = tmp_path / "cache" / key
    before = entry.stat()
    with open(entry, "r+b") as stream:  # the same size and mtime: only the bytes tell
        stream.seek(5000)
        stream.write(bytes([data[5000] ^ 1]))
    os.utime(entry, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert not cache.serve(key, landing.fd, "served")
    assert not (landing.path / "served").exists(), "a bad entry leaves nothing where it would have landed"
    assert not entry.exists() and cache.entries() == []


def test_etag_keys_never_climb_out_of_the_cache() -> None:
    assert content_key(None, '"d41d8cd98f00b204e9800998ecf8427e-3"', 7) == "etag/d41d8cd98f00b204e9800998ecf8427e-3-7"
    hostile = content_key(None, '"../../etc/passwd"', 7)
    assert hostile is not None and hostile.count("/") == 1 and ".." not in hostile
    assert content_key("ab" * 32, "x", 1) == f"sha256/{'ab' * 32}"
    assert content_key("not-hex", None, 1) is None


def test_leftovers_of_a_crash_are_swept_on_first_use(tmp_path: Path, landing: Landing) -> None:
    root = tmp_path / "cache"
    cache = Cache(root, 1 << 20)
    keys = []
    for name in ("a", "b"):
        key, digest = landing.write(name, os.urandom(KiB))
        cache.insert(key, landing.fd, name, digest, KiB)
        keys.append(key)
    (root / keys[0]).unlink()  # killed between unlinking an evicted file and deleting its row
    orphan = root / "sha256" / ("cd" * 32)
    orphan.write_bytes(b"renamed into place, then killed before the row committed")
    fresh_tmp = root / "tmp" / "0123456789abcdef"
    fresh_tmp.write_bytes(b"a running insert's link")
    restarted = Cache(root, 1 << 20)
    assert restarted.entries() == [(keys[1], KiB)]
    assert not orphan.exists()
    assert fresh_tmp.exists(), "a link younger than an hour may be another process's insert in progress"
    assert not restarted.serve(keys[0], landing.fd, "x") and restarted.serve(keys[1], landing.fd, "y")


def test_a_damaged_index_starts_afresh(tmp_path: Path, landing: Landing) -> None:
    root = tmp_path / "cache"
    key, digest = landing.write("a", os.urandom(KiB))
    Cache(root, 1 << 20).insert(key, landing.fd, "a", digest, KiB)
    (root / "index.sqlite").write_bytes(b"not a database" * 100)
    cache = Cache(root, 1 << 20)
    assert cache.entries() == []
    assert not (root / key).exists(), "files the new index does not know are swept"
    key2, digest2 = landing.write("b", os.urandom(KiB))
    cache.insert(key2, landing.fd, "b", digest2, KiB)
    assert cache.serve(key2, landing.fd, "b2")


def test_across_filesystems_entries_are_copied_and_verified(tmp_path: Path) -> None:
    other = Path("/dev/shm")
    if not other.is_dir() or other.stat().st_dev == tmp_path.stat().st_dev or not os.access(other, os.W_OK):
        pytest.skip("needs /dev/shm on another filesystem than the test's tmp folder")
    landing = Landing(tmp_path / "landing")
    shm = Path(os.path.join(other, f"spoold-cache-test-{os.getpid()}"))
    try:
        cache = Cache(shm, 1 << 20)
        data = os.urandom(10 * KiB)
        key, digest = landing.write("a", data)
        cache.insert(key, landing.fd, "a", digest, len(data))
        assert (shm / key).read_bytes() == data
        assert cache.serve(key, landing.fd, "b")
        assert (landing.path / "b").read_bytes() == data
        assert (landing.path / "b").stat().st_dev != (shm / key).stat().st_dev
    finally:
        os.close(landing.fd)
        subprocess.run(["rm", "-rf", str(shm)], check=True)


INSERTER = textwrap.dedent("""\
    import hashlib, os, sys
    from pathlib import Path
    from spoold.cache import Cache, content_key
    cache = Cache(Path(sys.argv[1]), 8 * 1024)  # room for 8 entries: every insert past that evicts
    landing = Path(sys.argv[2])
    fd = os.open(landing, os.O_RDONLY | os.O_DIRECTORY)
    n = 0
    while True:
        n += 1
        data = os.urandom(1024)
        (landing / "f").unlink(missing_ok=True)  # a new file each time: rewriting "f" would rewrite its entry
        (landing / "f").write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        cache.insert(content_key(digest, None, 1024), fd, "f", digest, 1024)
        if n == 50:
            print("busy", flush=True)
""")


def test_kill_9_while_inserting_and_evicting_leaves_a_consistent_cache(tmp_path: Path) -> None:
    root, landing = tmp_path / "cache", tmp_path / "landing"
    landing.mkdir()
    process = subprocess.Popen([sys.executable, "-c", INSERTER, str(root), str(landing)], stdout=subprocess.PIPE)
    try:
        assert process.stdout is not None
        assert wait_for(process.stdout.readline, 30, "inserts under way") == b"busy\n"
        wait_for(lambda: len(list((root / "sha256").iterdir())) >= 8, 10, "a full cache")
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()
    cache = Cache(root, 8 * 1024)
    entries = cache.entries()
    assert 1 <= len(entries) <= 9
    files = {f"sha256/{p.name}" for p in (root / "sha256").iterdir()}
    assert files == {key for key, _ in entries}, "every file has its row and every row its file"
    db = sqlite3.connect(root / "index.sqlite")
    try:
        for key, recorded in db.execute("SELECT key, sha256 FROM entries"):
            assert hashlib.sha256((root / key).read_bytes()).hexdigest() == recorded == key.split("/")[1]
    finally:
        db.close()
