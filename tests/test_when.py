"""`when:` beside a step: each condition, its config errors, and routing by size through the real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.conditions import When, build_when, payload_bytes, unmet
from spoold.daemon.config import parse_config
from spoold.errors import ConfigError
from spoold.options import Builder, Bytes
from spoold.statusview import render_item
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
EX_CONFIG = 78


def when(**raw: Any) -> When:
    return build_when(Builder(), raw, ("when",))


def judge(condition: When, *, payload: list[Path] | None = None, name: str = "clip.mp4", kind: str = "file",
          fields: dict[str, Any] | None = None) -> str | None:  # fmt: skip
    return unmet(condition, payload=payload or [], name=name, kind=kind, fields=fields or {})


def config_with_step(step: str) -> str:
    return "spool: /tmp/unused\nqueues:\n  q:\n    chain:\n" + textwrap.indent(textwrap.dedent(step), "      ")


def config_error(step: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_with_step(step), "t.yaml")
    return caught.value


# ---- the conditions ------------------------------------------------------------------------------------------


def test_sizes_of_files_and_folders_never_follow_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    folder = tmp_path / "ep"
    (folder / "cam" / "deep").mkdir(parents=True)
    (folder / "cam" / "f1").write_bytes(b"y" * 300)
    (folder / "cam" / "deep" / "f2").write_bytes(b"z" * 24)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"o" * 50_000)
    (folder / "link").symlink_to(outside)
    (folder / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(folder / "fifo")
    (tmp_path / "top-link").symlink_to(outside)

    assert payload_bytes([tmp_path / "a.bin"]) == 1000
    assert payload_bytes([folder]) == 324
    assert payload_bytes([tmp_path / "a.bin", folder, tmp_path / "top-link", tmp_path / "gone"]) == 1324

    below = when(size_below="1KiB")
    assert judge(below, payload=[folder]) is None
    assert judge(below, payload=[tmp_path / "a.bin"]) is None  # 1000 < 1024
    assert judge(below, payload=[tmp_path / "a.bin", folder]) == "size_below 1KiB: the payload is 1.3 KiB (1324 bytes)"
    at_least = when(size_at_least=1324)
    assert judge(at_least, payload=[tmp_path / "a.bin", folder]) is None
    assert judge(at_least, payload=[folder]) == "size_at_least 1324 bytes: the payload is 324 bytes"
    assert judge(when(size_at_least="100MB"), payload=[folder]) == "size_at_least 100MB: the payload is 324 bytes"
    # Both bounds: a band.
    band = when(size_at_least=300, size_below=400)
    assert judge(band, payload=[folder]) is None
    assert judge(band, payload=[tmp_path / "a.bin"]) is not None


def test_name_is_a_case_sensitive_glob() -> None:
    glob = when(name="*_CAM_[LR].mp4")
    assert judge(glob, name="s1_CAM_L.mp4") is None
    assert judge(glob, name="s1_CAM_C.mp4") == "name '*_CAM_[LR].mp4': the item is named 's1_CAM_C.mp4'"
    assert judge(glob, name="s1_cam_l.mp4") is not None


def test_kind_one_or_a_list() -> None:
    assert judge(when(kind="bundle"), kind="bundle") is None
    assert judge(when(kind="bundle"), kind="file") == "kind bundle: the item is a file"
    either = when(kind=["file", "request"])
    assert judge(either, kind="request") is None and judge(either, kind="file") is None
    assert judge(either, kind="bundle") == "kind file, request: the item is a bundle"


def test_fields_must_all_be_equal_as_json_values() -> None:
    condition = when(fields={"room_id": "lab", "episode_index": 5, "final": True})
    assert judge(condition, fields={"room_id": "lab", "episode_index": 5, "final": True, "other": 1}) is None
    assert judge(condition, fields={"room_id": "lab", "episode_index": 5.0, "final": True}) is None
    assert judge(condition, fields={"room_id": "lab", "episode_index": "5", "final": True}) == (
        'fields.episode_index == 5 (a number): the item has "5" (a string)'
    )
    # Python's True == 1 is not JSON's.
    assert judge(condition, fields={"room_id": "lab", "episode_index": 5, "final": 1}) == (
        "fields.final == true (a boolean): the item has 1 (a number)"
    )
    assert judge(condition, fields={"episode_index": 5, "final": True}) == (
        "fields.room_id == \"lab\" (a string): the item has no field 'room_id'"
    )
    assert judge(when(fields={"note": None}), fields={"note": None}) is None
    assert judge(when(fields={"note": None}), fields={"note": ""}) == 'fields.note == null: the item has "" (a string)'


def test_every_condition_must_hold_and_the_first_failure_is_named(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"b" * 2048)
    condition = when(size_at_least="1KiB", name="*.mp4", kind="file", fields={"room_id": "lab"})
    assert judge(condition, payload=[tmp_path / "big"], fields={"room_id": "lab"}) is None
    reason = judge(condition, payload=[tmp_path / "big"], name="x.mov", kind="bundle", fields={})
    assert reason is not None and reason.startswith("name '*.mp4'")


# ---- configuration -------------------------------------------------------------------------------------------


def test_when_beside_a_handler_in_either_order() -> None:
    config = parse_config(config_with_step("""\
        - ship: {to: 'file:///tmp/small/'}
          when: {size_below: 100MiB}
        - when: {size_at_least: 100MiB, kind: bundle}
          ship: {to: 'file:///tmp/large/'}
        - checksum
        """), "t.yaml")  # fmt: skip
    first, second, third = config.queues["q"].steps
    assert first.name == "ship" and first.when == When(size_below=Bytes(100 * 1024**2))
    assert second.name == "ship" and second.when == When(size_at_least=Bytes(100 * 1024**2), kind=["bundle"])
    assert third.when is None


@pytest.mark.parametrize(("step", "path", "line", "words"), [
    ("- ship: {to: 'file:///x/'}\n  when: {size_over: 1MiB}\n", "queues.q.chain[0].when.size_over", 6,
     "unknown key 'size_over'"),
    ("- checksum: {}\n  when: {}\n", "queues.q.chain[0].when", 6, "has no conditions"),
    ("- checksum: {}\n  when:\n", "queues.q.chain[0].when", 6, "mapping of conditions"),
    ("- checksum: {}\n  when: {kind: folder}\n", "queues.q.chain[0].when.kind", 6, "'file', 'bundle', 'request'"),
    ("- checksum: {}\n  when: {kind: [file, folder]}\n", "queues.q.chain[0].when.kind[1]", 6, "got 'folder'"),
    ("- checksum: {}\n  when: {size_below: lots}\n", "queues.q.chain[0].when.size_below", 6, "size"),
    ("- checksum: {}\n  when: {size_below: 1KiB, size_at_least: 1MiB}\n", "queues.q.chain[0].when", 6,
     "can never both hold"),
    ("- checksum: {}\n  when: {fields: {a: [1]}}\n", "queues.q.chain[0].when.fields.a", 6, "string, number"),
    ("- checksum: {}\n  when: {fields: {}}\n", "queues.q.chain[0].when.fields", 6, "no fields"),
    ("- checksum: {}\n  wen: {name: '*'}\n", "queues.q.chain[0].wen", 6, "did you mean 'when'"),
    ("- checksum: {}\n  manifest: {}\n", "queues.q.chain[0]", 5, "one `handler: {options}` mapping"),
    ("- when: {name: '*'}\n", "queues.q.chain[0]", 5, "one `handler: {options}` mapping"),
])  # fmt: skip
def test_bad_when_is_a_config_error_naming_path_and_line(step: str, path: str, line: int, words: str) -> None:
    error = config_error(step)
    assert error.path == path and error.line == line, error
    assert words in error.message


def test_check_exits_78_on_an_unknown_condition(tmp_path: Path) -> None:
    config = tmp_path / "spoold.yaml"
    config.write_text(config_with_step("- checksum: {}\n  when: {size_below: 1MiB, colour: red}\n"))
    result = subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(config)], capture_output=True,
                            text=True, timeout=30)  # fmt: skip
    assert result.returncode == EX_CONFIG
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert f"{config}:6: queues.q.chain[0].when.colour: unknown key 'colour'" in result.stderr
    good = tmp_path / "good.yaml"
    good.write_text(config_with_step("- checksum: {}\n  when: {size_below: 1MiB, kind: [file]}\n"))
    assert subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(good)], capture_output=True,
                          timeout=30).returncode == 0  # fmt: skip


def test_status_shows_why_a_step_was_skipped() -> None:
    document = {"queue": "q", "item": "a.txt", "original_name": "a.txt", "state": "done", "steps": [
        {"name": "ship", "state": "skipped", "skipped": "size_below 1KiB: the payload is 2.0 KiB (2048 bytes)"},
        {"name": "ship", "state": "done"}]}  # fmt: skip
    lines = render_item(document).splitlines()
    assert lines[1].split() == ["-", "ship", "skipped:", "size_below", "1KiB:", "the", "payload", "is", "2.0", "KiB",
                                "(2048", "bytes)"]  # fmt: skip
    assert lines[2].split() == ["-", "ship", "done"]


# ---- through the real daemon ---------------------------------------------------------------------------------


def test_routing_by_size(tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            chain:
              - ship: {to: 'file://{tmp}/small/'}
                when: {size_below: 1KiB}
              - when: {size_at_least: 1KiB}
                ship: {to: 'file://{tmp}/large/'}
          datasets:
            items: bundles
            chain:
              - bundle: {format: tar, compression: 9}
              - ship: {to: 'file://{tmp}/store/'}
                when: {size_below: 64KiB}
              - ship: {to: 'file://{tmp}/s3/'}
                when: {size_at_least: 64KiB, fields: {room_id: lab}}
        """)
    daemon(config)
    small, large = b"s" * 100, os.urandom(4096)
    (spool / "q" / "inbox" / "small.txt").write_bytes(small)
    (spool / "q" / "inbox" / "large.bin").write_bytes(large)
    # 003's client: the size that counts is the archive's, not the folder's (a MiB of zeros compresses well).
    bundles = {"zeros": (b"\0" * 1024**2, "lab"), "noise": (os.urandom(200 * 1024), "lab"),
               "elsewhere": (os.urandom(200 * 1024), "other")}  # fmt: skip
    for name, (body, room) in bundles.items():
        (spool / "datasets" / "inbox" / name).mkdir()
        (spool / "datasets" / "inbox" / name / "data.bin").write_bytes(body)
        (spool / "datasets" / "inbox" / f"{name}.ready").write_text(json.dumps({"room_id": room}))

    small_doc = wait_for(sidecar_state(spool, "q", "small.txt", "done"), 15, "small done")
    large_doc = wait_for(sidecar_state(spool, "q", "large.bin", "done"), 15, "large done")
    assert os.listdir(tmp_path / "small") == ["small.txt"] and os.listdir(tmp_path / "large") == ["large.bin"]
    assert (tmp_path / "small" / "small.txt").read_bytes() == small
    assert (tmp_path / "large" / "large.bin").read_bytes() == large
    assert [s["state"] for s in small_doc["steps"]] == ["done", "skipped"]
    assert small_doc["steps"][1]["skipped"] == "size_at_least 1KiB: the payload is 100 bytes"
    assert "started" not in small_doc["steps"][1] and small_doc["error"] is None
    assert [s["state"] for s in large_doc["steps"]] == ["skipped", "done"]
    assert large_doc["steps"][0]["skipped"] == "size_below 1KiB: the payload is 4.0 KiB (4096 bytes)"

    docs = {name: wait_for(sidecar_state(spool, "datasets", name, "done"), 15, f"{name} done") for name in bundles}
    assert [s["state"] for s in docs["zeros"]["steps"]] == ["done", "done", "skipped"]
    assert [s["state"] for s in docs["noise"]["steps"]] == ["done", "skipped", "done"]
    assert [s["state"] for s in docs["elsewhere"]["steps"]] == ["done", "skipped", "skipped"]
    assert docs["elsewhere"]["steps"][2]["skipped"] == (
        'fields.room_id == "lab" (a string): the item has "other" (a string)'
    )
    assert sorted(os.listdir(tmp_path / "store")) == ["zeros.tar.gz"]
    assert sorted(os.listdir(tmp_path / "s3")) == ["noise.tar.gz"]

    status = subprocess.run([sys.executable, "-m", "spoold", "status", "-c", str(config), "q", "small.txt"],
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert "skipped: size_at_least 1KiB: the payload is 100 bytes" in status.stdout


WAITER = """\
import sys, time
from pathlib import Path
here = Path(__file__).parent
with open(here / "calls.log", "a") as log:
    log.write(sys.argv[1] + "\\n")
deadline = time.monotonic() + 20
while not (here / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)  # a poll's interval, bounded by the deadline: not synchronisation
sys.exit(0 if (here / "go").exists() else 1)
"""


def test_a_skipped_step_stays_skipped_after_kill_9(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                   daemon: Start) -> None:  # fmt: skip
    tool = tmp_path / "waiter.py"
    tool.write_text(WAITER)

    def chain(first_when: str, second_when: str) -> Path:
        return write_config(f"""\
            spool: {{spool}}
            queues:
              q:
                settle: 0s
                chain:
                  - exec: {{argv: ['{sys.executable}', '{tool}', first]}}
                    when: {first_when}
                  - exec: {{argv: ['{sys.executable}', '{tool}', second], timeout: 1m}}
                    when: {second_when}
            """)

    first = daemon(chain("{size_at_least: 1MiB}", "{name: '*.txt'}"))
    (spool / "q" / "inbox" / "job.txt").write_text("job")

    def second_running() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "q", "job.txt")
        calls = (tmp_path / "calls.log").read_text().split() if (tmp_path / "calls.log").exists() else []
        return doc if doc and doc["steps"][1]["state"] == "running" and calls == ["second"] else None

    before = wait_for(second_running, 15, "the second step running")
    assert before["steps"][0]["state"] == "skipped"
    first.kill()

    # The restarted daemon's conditions would now run the first step and skip the second; neither may change:
    # the first was judged already, and the second had started.
    daemon(chain("{size_at_least: 1}", "{name: 'nothing-matches'}"))
    wait_for(lambda: (tmp_path / "calls.log").read_text().split() == ["second", "second"], 15,
             "the interrupted second step run again")  # fmt: skip
    (tmp_path / "go").touch()
    after = wait_for(sidecar_state(spool, "q", "job.txt", "done"), 15, "done after the restart")
    assert after["steps"][0] == before["steps"][0]
    assert after["steps"][0]["skipped"] == "size_at_least 1MiB: the payload is 3 bytes"
    assert after["steps"][1]["state"] == "done"
    assert (tmp_path / "calls.log").read_text().split() == ["second", "second"]
