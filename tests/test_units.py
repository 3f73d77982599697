"""Small pure pieces: durations, sizes, templates, redaction, digests, item names."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import xxhash

from spoold.daemon.items import item_name_for
from spoold.daemon.layout import QueueFolders, split_name
from spoold.digest import hash_file
from spoold.errors import TemplateError
from spoold.options import parse_duration, parse_size
from spoold.redact import redact, register_secret
from spoold.templates import render


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("2s", 2), ("5m", 300), ("12h", 43200), ("7d", 604800),
                                               (3, 3), (0.25, 0.25), ("0s", 0)])  # fmt: skip
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["soon", "5 parsecs", "-1s", -1, True, "1.2.3s", ""])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [("64MiB", 64 << 20), ("5GiB", 5 << 30), ("10GB", 10 * 10**9),
                                            (1024, 1024), ("512KiB", 512 << 10), ("1.5GiB", 3 << 29)])  # fmt: skip
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "5 parsecs", -1, False, "GiB"])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_render_templates() -> None:
    values = {"name": "a.mp4", "session": "s1", "n": 5}
    assert render("/x/{session}/{name}", values) == "/x/s1/a.mp4"
    assert render("{n:03d}", values) == "005"
    with pytest.raises(TemplateError, match="needs field 'missing'"):
        render("{missing}", values)
    with pytest.raises(TemplateError, match="plain name"):
        render("{name.__class__}", values)
    with pytest.raises(TemplateError, match="malformed"):
        render("{unclosed", values)


@pytest.mark.parametrize("value", ["..", "../etc", "a/../../b", "a/.."])
def test_render_refuses_escaping_paths(value: str) -> None:
    with pytest.raises(TemplateError, match="escape"):
        render("/base/{x}/file", {"x": value})
    assert render("{x}", {"x": value}, is_path=False) == value


def test_redact_masks_secret_shapes() -> None:
    text = redact("password=hunter2 https://bob:pw123@host/x Authorization: Bearer abc.def token: xyz987")
    for secret in ("hunter2", "pw123", "abc.def", "xyz987"):
        assert secret not in text
    assert "https://bob:***@host/x" in text
    register_secret("correct-horse-battery")
    assert "correct-horse-battery" not in redact("key is correct-horse-battery, ok")
    assert redact("nothing secret here") == "nothing secret here"


def test_hash_file_matches_reference_digests(tmp_path: Path) -> None:
    data = bytes(range(256)) * 40_000 + b"tail"  # spans several read chunks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    digests = hash_file(path, ["sha256", "xxh3_128", "xxh64", "md5"])
    assert digests == {
        "sha256": hashlib.sha256(data).hexdigest(),
        "xxh3_128": xxhash.xxh3_128(data).hexdigest(),
        "xxh64": xxhash.xxh64(data).hexdigest(),
        "md5": hashlib.md5(data).hexdigest(),
    }
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert hash_file(empty, ["sha256"])["sha256"] == hashlib.sha256(b"").hexdigest()


def test_hash_file_never_follows_a_symlink(tmp_path: Path) -> None:
    (tmp_path / "target").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        hash_file(tmp_path / "link", ["sha256"])


def test_item_names() -> None:
    assert item_name_for("abc123.json", "request") == "abc123"
    assert item_name_for("session1.fetch.json", "request") == "session1"
    assert item_name_for("abc123.json", "file") == "abc123.json"
    assert item_name_for(".json", "request") == ".json"
    assert split_name("foo.tar.gz") == ("foo.tar", ".gz")
    assert split_name("episode_5") == ("episode_5", "")
    assert split_name(".hidden") == (".hidden", "")


def test_free_name_never_reuses(tmp_path: Path) -> None:
    folders = QueueFolders(tmp_path, "q")
    for sub in ("work", "done", "failed", "status"):
        (folders.root / sub).mkdir(parents=True)
    assert folders.reserve("foo.mp4") == "foo.mp4"
    assert folders.reserve("foo.mp4") == "foo.1.mp4"
    (folders.status / "foo.2.mp4.json").write_text("{}")  # a sidecar alone holds the name too
    (folders.done / "foo.3.mp4").mkdir()
    assert folders.reserve("foo.mp4") == "foo.4.mp4"
    assert folders.reserve("noext") == "noext"
    assert folders.reserve("noext") == "noext.1"
