"""Intake through the real daemon: settle, ignore patterns, bundles, requests, collisions, rejections, scans."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from spoold.daemon.sidecar import parse_iso
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]


def one_queue(write_config: WriteConfig, extra: str = "", chain: str = "[checksum]", rescan: str = "60s") -> Path:
    return write_config(f"""\
spool: {{spool}}
rescan: {rescan}
queues:
  q:
    chain: {chain}
{extra}""")


def inbox(spool: Path, queue: str = "q") -> Path:
    return spool / queue / "inbox"


def sidecar_names(spool: Path, queue: str = "q") -> list[str]:
    return sorted(p.name[: -len(".json")] for p in (spool / queue / "status").glob("*.json"))


def rescan_passed(tmp_path: Path, spool: Path, name: str, queue: str = "q") -> None:
    """Wait until a rescan of `queue` has run: hard-link a file in (only IN_CREATE, which the daemon does not
    subscribe to, so only a rescan finds it) and wait for its item. Every call waits for another rescan."""
    outside = tmp_path / f"rescan-probe-{queue}-{name}"
    outside.write_text(name)
    os.link(outside, inbox(spool, queue) / name)
    wait_for(lambda: read_sidecar(spool, queue, name), 10, f"a rescan of {queue} to find {name}")


def test_file_is_claimed_only_after_settle(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    daemon(one_queue(write_config, "    settle: 1s\n"))
    path = inbox(spool) / "a.bin"
    path.write_bytes(b"a" * 100)
    closed = time.time()
    doc = wait_for(lambda: read_sidecar(spool, "q", "a.bin"), 10, "claim")
    created = parse_iso(doc["created"])
    assert created is not None and created - closed >= 0.9, f"claimed {created - closed:.2f}s after close; settle is 1s"
    assert wait_for(sidecar_state(spool, "q", "a.bin", "done"))["steps"][0]["result"]["bytes"] == 100


def test_file_still_being_appended_is_not_claimed(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    daemon(one_queue(write_config, "    settle: 1s\n", rescan="1s"))
    path = inbox(spool) / "growing.bin"
    # Appends with a close between them (each close is an event) ...
    for _ in range(8):
        with open(path, "ab") as stream:
            stream.write(b"x" * 1000)
        time.sleep(0.3)  # a slow writer's pacing: not synchronisation
        assert read_sidecar(spool, "q", "growing.bin") is None, "claimed while still being appended"
    # ... then appends on one open handle (no event at all; only scans see it).
    with open(path, "ab") as stream:
        for _ in range(8):
            stream.write(b"y" * 1000)
            stream.flush()
            time.sleep(0.3)  # a slow writer's pacing: not synchronisation
            assert read_sidecar(spool, "q", "growing.bin") is None, "claimed while still open and growing"
    done = wait_for(sidecar_state(spool, "q", "growing.bin", "done"), 10, "growing file done")
    assert done["steps"][0]["result"]["bytes"] == 16000


def test_file_open_for_writing_is_not_claimed_during_a_long_pause(tmp_path: Path, write_config: WriteConfig,
                                                                  spool: Path, daemon: Start) -> None:  # fmt: skip
    # torture/producers.py: a writer pausing longer than settle on an open handle was claimed by a rescan
    # (no event, quiet size and mtime), and its checksum and ship saw a truncated file.
    daemon(one_queue(write_config, "    settle: 0.3s\n", rescan="1s"))
    path = inbox(spool) / "paused.bin"
    with open(path, "wb") as stream:
        stream.write(b"a" * 1000)
        stream.flush()
        # The writer pauses, nothing changing, through two rescans: the second comes a rescan period (1s, many
        # settle periods) after the first, so it meets a file quiet for longer than settle.
        rescan_passed(tmp_path, spool, "probe1.bin")
        rescan_passed(tmp_path, spool, "probe2.bin")
        assert read_sidecar(spool, "q", "paused.bin") is None, "claimed while still open for writing"
        stream.write(b"b" * 1000)
    done = wait_for(sidecar_state(spool, "q", "paused.bin", "done"), 10, "paused file done")
    assert done["steps"][0]["result"]["bytes"] == 2000


def test_a_removed_inbox_is_made_and_watched_again(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    # torture/events.py: after a producer's `rm -rf inbox && mkdir inbox` the watch was dead (watchdog stops it
    # on IN_DELETE_SELF) and files waited for the periodic rescan, 60 s by default.
    daemon(one_queue(write_config, "    settle: 0s\n", rescan="60s"))
    shutil.rmtree(inbox(spool))
    wait_for(lambda: inbox(spool).is_dir(), 10, "the inbox made again")
    for name in ("one.bin", "two.bin"):
        (inbox(spool) / name).write_bytes(name.encode())
        wait_for(sidecar_state(spool, "q", name, "done"), 10, f"{name} done long before the rescan")


def test_ignore_patterns(tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          q:
            settle: 0s
            chain: [checksum]
          custom:
            settle: 0s
            ignore: ['*.wip']
            chain: [checksum]
        """)
    daemon(config)
    ignored = [".hidden", "upload.part", "data.tmp", "notes.txt~"]
    for name in ignored:
        (inbox(spool) / name).write_text(name)
    (inbox(spool, "custom") / "x.wip").write_text("wip")
    (inbox(spool, "custom") / "x.part").write_text("part is not ignored here: patterns replace the default")
    for queue in ("q", "custom"):  # a rescan passes over the ignored names
        rescan_passed(tmp_path, spool, "probe.bin", queue)
    (inbox(spool) / "real.txt").write_text("real")
    wait_for(sidecar_state(spool, "q", "real.txt", "done"), 10, "real file done")
    wait_for(sidecar_state(spool, "custom", "x.part", "done"), 10, "x.part done in the custom queue")
    wait_for(sidecar_state(spool, "q", "probe.bin", "done"), 10, "the probe done")
    assert sidecar_names(spool) == ["probe.bin", "real.txt"]
    assert sorted(os.listdir(inbox(spool))) == sorted(ignored)
    assert os.listdir(inbox(spool, "custom")) == ["x.wip"]
    assert sorted(sidecar_names(spool, "custom")) == ["probe.bin", "x.part"]


def test_bundle_with_ready_marker(tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    daemon(one_queue(write_config, """\
    items: bundles
    settle: 0s
    fields: {pattern: '^(?P<repo_id>.+)_ep(?P<episode_index>\\d+)$'}
""", chain="[checksum, manifest]", rescan="1s"))
    episode = inbox(spool) / "robot_ep7"
    for cam in ("cam_left", "cam_right"):
        (episode / cam).mkdir(parents=True)
        for i in range(3):
            (episode / cam / f"frame_{i}.png").write_bytes(bytes([i]) * 10)
    rescan_passed(tmp_path, spool, "probe_ep1")  # a rescan runs; the folder has no marker, so it stays
    assert read_sidecar(spool, "q", "robot_ep7") is None
    (inbox(spool) / "robot_ep7.ready").write_text(json.dumps({"operator": "ann", "episode_index": "7"}))
    doc = wait_for(sidecar_state(spool, "q", "robot_ep7", "done"), 10, "bundle done")
    assert doc["kind"] == "bundle"
    assert doc["fields"] == {"repo_id": "robot", "episode_index": "7", "operator": "ann"}
    assert doc["steps"][0]["result"]["bytes"] == 60
    assert os.listdir(inbox(spool)) == [], "the marker is consumed with its item"
    manifest = json.loads((spool / "q" / "done" / "robot_ep7" / "robot_ep7.manifest.json").read_text())
    assert len(manifest["files"]) == 6 and manifest["fields"]["operator"] == "ann"


def test_bundle_ready_by_settle(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    daemon(one_queue(write_config, "    items: bundles\n    ready: settle\n    settle: 1s\n"))
    folder = inbox(spool) / "batch"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.txt").write_text(str(i))
        time.sleep(0.3)  # files arriving slowly (less than settle apart): not synchronisation
        assert read_sidecar(spool, "q", "batch") is None, "claimed while files were still arriving"
    (folder / "sub").mkdir()
    (folder / "sub" / "late.txt").write_text("late")
    doc = wait_for(sidecar_state(spool, "q", "batch", "done"), 10, "settled bundle done")
    assert doc["kind"] == "bundle" and doc["steps"][0]["result"]["bytes"] == 9
    assert sorted(os.listdir(spool / "q" / "done" / "batch" / "batch")) == ["0.txt", "1.txt", "2.txt", "3.txt",
                                                                           "4.txt", "sub"]  # fmt: skip


def test_requests_queue(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    daemon(one_queue(write_config, "    items: requests\n    settle: 0s\n",
                     chain="[{exec: {argv: [/bin/echo, '{session}']}}]"))  # fmt: skip
    (inbox(spool) / "abc.json").write_text(json.dumps({"session": "s42", "n": 3}))
    (inbox(spool) / "broken.json").write_text("{not json")
    (inbox(spool) / "list.json").write_text("[1, 2]")
    (inbox(spool) / "notes.txt").write_text("not a request")
    doc = wait_for(sidecar_state(spool, "q", "abc", "done"), 10, "request done")
    assert doc["kind"] == "request" and doc["fields"] == {"session": "s42", "n": 3}
    assert doc["original_name"] == "abc.json"
    broken = wait_for(sidecar_state(spool, "q", "broken", "failed"), 10, "invalid request failed")
    assert "not valid JSON" in broken["error"]["message"] and broken["error"]["retryable"] is False
    wait_for((spool / "q" / "failed" / "broken").is_dir, 10, "the invalid request moved to failed/")
    listed = wait_for(sidecar_state(spool, "q", "list", "failed"), 10, "non-object request failed")
    assert "object" in listed["error"]["message"]
    notes = wait_for(sidecar_state(spool, "q", "notes.txt", "failed"), 10, "non-json file failed")
    assert ".json" in notes["error"]["message"]


def test_name_collision_makes_a_new_item(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    daemon(one_queue(write_config, "    settle: 0s\n"))
    (inbox(spool) / "foo.mp4").write_bytes(b"first")
    wait_for(sidecar_state(spool, "q", "foo.mp4", "done"), 10, "first foo.mp4")
    (inbox(spool) / "foo.mp4").write_bytes(b"second!")
    second = wait_for(sidecar_state(spool, "q", "foo.1.mp4", "done"), 10, "second foo.mp4 as foo.1.mp4")
    assert second["original_name"] == "foo.mp4"
    assert (spool / "q" / "done" / "foo.mp4" / "foo.mp4").read_bytes() == b"first"
    assert (spool / "q" / "done" / "foo.1.mp4" / "foo.1.mp4").read_bytes() == b"second!"
    (inbox(spool) / "foo.mp4").write_bytes(b"third")
    third = wait_for(sidecar_state(spool, "q", "foo.2.mp4", "done"), 10, "third as foo.2.mp4")
    assert third["original_name"] == "foo.mp4"


def test_symlink_fifo_and_folder_are_rejected_unread(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                     daemon: Start) -> None:  # fmt: skip
    daemon(one_queue(write_config, "    settle: 0s\n", rescan="1s"))
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read me")
    os.symlink(secret, inbox(spool) / "link.txt")
    os.mkfifo(inbox(spool) / "pipe")
    (inbox(spool) / "folder").mkdir()
    (inbox(spool) / "folder" / "x").write_text("x")
    link = wait_for(sidecar_state(spool, "q", "link.txt", "failed"), 10, "symlink rejected")
    assert "symlink" in link["error"]["message"] and "never followed" in link["error"]["message"]
    pipe = wait_for(sidecar_state(spool, "q", "pipe", "failed"), 10, "FIFO rejected")
    assert "FIFO" in pipe["error"]["message"]
    folder = wait_for(sidecar_state(spool, "q", "folder", "failed"), 10, "folder rejected")
    assert "folder" in folder["error"]["message"] and "bundles" in folder["error"]["message"]
    # The sidecar says `failed` just before the entry is moved to failed/.
    moved = spool / "q" / "failed" / "link.txt" / "link.txt"
    wait_for(lambda: os.path.lexists(moved), 10, "the link moved to failed/")
    assert moved.is_symlink(), "the link itself is kept in failed/, not its target"
    assert secret.read_text() == "do not read me"
    wait_for(lambda: os.path.lexists(spool / "q" / "failed" / "pipe" / "pipe"), 10, "the FIFO moved to failed/")
    assert (spool / "q" / "failed" / "pipe" / "pipe").is_fifo()
    assert all(d["steps"][0]["state"] == "pending" for d in (link, pipe, folder)), "no step ran"


def test_files_present_before_start_are_found(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = one_queue(write_config, "    settle: 0s\n")
    inbox(spool).mkdir(parents=True)
    for i in range(5):
        (inbox(spool) / f"early{i}.txt").write_text(str(i))
    daemon(config)
    for i in range(5):
        wait_for(sidecar_state(spool, "q", f"early{i}.txt", "done"), 10, f"early{i} done")


def test_file_missed_by_inotify_is_found_by_rescan_once(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                         daemon: Start) -> None:  # fmt: skip
    process = daemon(one_queue(write_config, "    settle: 0s\n", rescan="1s"))
    outside = tmp_path / "outside.txt"
    outside.write_text("linked in")
    # A hard link makes only IN_CREATE, which the daemon does not subscribe to: only a rescan finds it.
    os.link(outside, inbox(spool) / "linked.txt")
    doc = wait_for(sidecar_state(spool, "q", "linked.txt", "done"), 10, "linked file done")
    assert doc["attempts"] == 1
    rescan_passed(tmp_path, spool, "probe1.bin")  # two more rescans must not claim anything again
    rescan_passed(tmp_path, spool, "probe2.bin")
    assert sidecar_names(spool) == ["linked.txt", "probe1.bin", "probe2.bin"]
    assert process.log().count("q/linked.txt: claimed") == 1


def test_claims_are_prompt_under_a_steady_stream(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    """Each claim moves an entry out of the inbox; that must not hold back the next arrival's event
    (watchdog delays an unpaired IN_MOVED_FROM by 0.5 s at the head of its queue)."""
    daemon(one_queue(write_config, "    settle: 0s\n    concurrency: 2\n"))
    closed: dict[str, float] = {}
    for i in range(30):
        name = f"s{i:02d}.bin"
        (inbox(spool) / name).write_bytes(b"s" * 1000)
        closed[name] = time.time()
        time.sleep(0.03)  # a steady stream's pacing: not synchronisation
    delays = []
    for name, at in closed.items():
        doc = wait_for(lambda name=name: read_sidecar(spool, "q", name), 10, f"{name} claimed")
        created = parse_iso(doc["created"])
        assert created is not None
        delays.append(created - at)
    delays.sort()
    assert delays[len(delays) // 2] < 0.1, f"median claim delay {delays[len(delays) // 2]:.3f}s: {delays}"
    assert delays[-1] < 0.45, f"worst claim delay {delays[-1]:.3f}s"
