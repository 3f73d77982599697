"""`gather:` through the real daemon: members wait until their group is whole, one group item runs the chain,
members follow it; duplicates and strangers are rejected; a group times out naming who is missing, and
`spoold retry` makes it wait again; `kill -9` at every point of forming a group leaves exactly one group item."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import parse_config
from spoold.errors import ConfigError
from spoold.fsio import parse_iso
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
CAMERAS = ("CAM_L", "CAM_C", "CAM_R")

FILES_CONFIG = """\
    spool: {spool}
    rescan: 1s
    queues:
      sessions:
        settle: 0s
        fields: {pattern: '^(?P<session_id>.+)_(?P<camera_id>CAM_[A-Z]+)\\.mp4$'}
        gather: {by: '{session_id}', expect: {camera_id: [CAM_L, CAM_C, CAM_R]}, timeout: TIMEOUT}
        chain:
          - checksum: {algorithms: [sha256]}
          - ship: {to: 'file://{tmp}/dest/'}
    """

# Loaded by the daemon's interpreter (sitecustomize): SIGKILL the daemon itself at the Nth call of a function.
KILL_HOOK = """\
import importlib, os, signal
module_name, attribute, when, count = os.environ["SPOOLD_TEST_KILL_AT"].split(":")
module = importlib.import_module(module_name)
owner_name, _, name = attribute.rpartition(".")
owner = getattr(module, owner_name) if owner_name else module
original = getattr(owner, name)
calls = [0]

def hooked(*args, **kwargs):
    calls[0] += 1
    if when == "before" and calls[0] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if when == "after" and calls[0] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
    return result

setattr(owner, name, hooked)
"""


def files_config(write_config: WriteConfig, timeout: str = "1h") -> Path:
    return write_config(FILES_CONFIG.replace("TIMEOUT", timeout))


def drop(inbox: Path, name: str, data: bytes) -> None:
    temp = inbox / f".{name}.tmp"
    temp.write_bytes(data)
    os.rename(temp, inbox / name)


def recording(session: str, camera: str) -> bytes:
    return f"{session}/{camera} ".encode() * 500


def members(session: str) -> dict[str, str]:
    return {camera: f"{session}_{camera}.mp4" for camera in CAMERAS}


def group_items(spool: Path, queue: str, session: str) -> list[dict[str, Any]]:
    found = []
    for path in (spool / queue / "status").glob("*.json"):
        doc = json.loads(path.read_text())
        if doc.get("forwarded_from") == f"gather:{session}":
            found.append(doc)
    return found


def waiting_with(spool: Path, item: str, have: list[str]) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "sessions", item)
        return doc if doc and doc["state"] == "waiting" and doc["gather"]["have"] == have else None

    return check


def assert_gathered_once(spool: Path, tmp_path: Path, session: str, timeout: float = 20) -> dict[str, Any]:
    """The session's one group item is done and holds each camera once; every member is done and points at it."""
    wait_for(lambda: all((read_sidecar(spool, "sessions", m) or {}).get("state") == "done"
                         for m in members(session).values()), timeout, f"{session}'s members done")  # fmt: skip
    groups = group_items(spool, "sessions", session)
    assert [g["state"] for g in groups] == ["done"], groups
    group = groups[0]
    assert group["item"] == session
    assert group["gathered"] == {"group": session, "members": members(session)}
    assert group["fields"] == {"session_id": session}
    shipped = tmp_path / "dest" / session
    assert sorted(p.name for p in shipped.iterdir()) == sorted(CAMERAS)
    for camera, member in members(session).items():
        assert [p.name for p in (shipped / camera).iterdir()] == [member]
        assert (shipped / camera / member).read_bytes() == recording(session, camera)
        doc = read_sidecar(spool, "sessions", member) or {}
        assert doc["gather"]["item"] == session and doc["gather"]["missing"] == []
        assert doc["steps"] == [{**doc["steps"][0], "name": "gather", "state": "done"}]
        assert (spool / "sessions" / "done" / member).is_dir()
        assert os.listdir(spool / "sessions" / "done" / member) == [], "a member's data lives in its group item"
    return group


def spoold_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "COLUMNS": "100"})  # fmt: skip


# ---- config --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gather", "message"), [
    ("{by: '{s}', expect: {camera_id: [A], other: [B]}}", "exactly one field"),
    ("{by: '{s}', expect: {camera_id: []}}", "at least one value"),
    ("{by: '{s}', expect: {camera_id: [A, B, A]}}", "lists 'A' twice"),
    ("{by: '{s}', expect: {camera_id: [A]}, timout: 2h}", "did you mean 'timeout'"),
    ("{by: '{s}', expect: {camera_id: [../x]}}", "cannot name a folder"),
    ("{by: '{s}/{t}', expect: {camera_id: [A]}}", "no '/'"),
    ("{expect: {camera_id: [A]}}", "missing required key 'by'"),
])  # fmt: skip
def test_config_errors_name_the_yaml_line(gather: str, message: str) -> None:
    text = textwrap.dedent(f"""\
        spool: /tmp/unused
        queues:
          sessions:
            settle: 0s
            gather: {gather}
            chain:
              - checksum: {{}}
        """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.yaml")
    assert message in str(caught.value)
    assert caught.value.line == 5, caught.value.describe()


def test_a_valid_gather_loads() -> None:
    text = "queues:\n  s:\n    gather: {by: '{sid}', expect: {cam: [L, R]}}\n    chain: [checksum]\n"
    config = parse_config(text, "x")
    spec = config.queues["s"].spec.gather
    assert spec is not None and spec.field == "cam" and spec.values == ["L", "R"] and spec.timeout == 7200


# ---- gathering -----------------------------------------------------------------------------------------------


def test_three_files_in_any_order_make_one_group_item(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                      daemon: Start) -> None:  # fmt: skip
    config = files_config(write_config)
    process = daemon(config)
    inbox = spool / "sessions" / "inbox"
    names = members("GAME_1")
    drop(inbox, names["CAM_R"], recording("GAME_1", "CAM_R"))
    first = wait_for(waiting_with(spool, names["CAM_R"], ["CAM_R"]), 10, "CAM_R waiting")
    assert first["step"] == "gather" and first["gather"]["missing"] == ["CAM_L", "CAM_C"]
    assert first["gather"]["group"] == "GAME_1" and first["gather"]["item"] is None
    status = spoold_cli("status", "-c", str(config))
    assert status.returncode == 0 and "missing CAM_L, CAM_C (group GAME_1)" in status.stdout, status.stdout
    status = spoold_cli("status", "-c", str(config), "sessions", names["CAM_R"])
    assert "gather: missing CAM_L, CAM_C (group GAME_1, until 20" in status.stdout, status.stdout

    # A second CAM_R while the first waits, and a camera the group does not expect: both rejected.
    drop(inbox, names["CAM_R"], b"an impostor")
    drop(inbox, "GAME_1_CAM_X.mp4", b"a stranger")
    duplicate = wait_for(sidecar_state(spool, "sessions", "GAME_1_CAM_R.1.mp4", "failed"), 10, "duplicate rejected")
    assert duplicate["error"]["type"] == "rejected"
    assert "duplicate member of group GAME_1: camera_id CAM_R already arrived as GAME_1_CAM_R.mp4" in (
        duplicate["error"]["message"])  # fmt: skip
    stranger = wait_for(sidecar_state(spool, "sessions", "GAME_1_CAM_X.mp4", "failed"), 10, "stranger rejected")
    assert "camera_id 'CAM_X' is not one of CAM_L, CAM_C, CAM_R" in stranger["error"]["message"]

    drop(inbox, names["CAM_C"], recording("GAME_1", "CAM_C"))
    wait_for(waiting_with(spool, names["CAM_C"], ["CAM_C", "CAM_R"]), 10, "CAM_C waiting")
    assert (read_sidecar(spool, "sessions", names["CAM_R"]) or {})["gather"]["missing"] == ["CAM_L"]
    drop(inbox, names["CAM_L"], recording("GAME_1", "CAM_L"))
    group = assert_gathered_once(spool, tmp_path, "GAME_1")
    assert group["kind"] == "bundle" and group["payload"] == ["GAME_1"]
    assert [s["state"] for s in group["steps"]] == ["done", "done"]
    assert (spool / "sessions" / "failed" / "GAME_1_CAM_R.1.mp4" / "GAME_1_CAM_R.1.mp4").read_bytes() == b"an impostor"

    # The session again, once the first group is finished: a new group, under a new name.
    for camera, name in names.items():
        drop(inbox, name, recording("GAME_1", camera))
    wait_for(lambda: [g["state"] for g in group_items(spool, "sessions", "GAME_1")] == ["done", "done"], 15,
             "the second group done")  # fmt: skip
    assert sorted(g["item"] for g in group_items(spool, "sessions", "GAME_1")) == ["GAME_1", "GAME_1.1"]
    assert (read_sidecar(spool, "sessions", "GAME_1_CAM_L.1.mp4") or {})["gather"]["item"] == "GAME_1.1"
    assert process.stop() == 0


def test_bundles_with_extras_are_laid_out_by_member(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                                    daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          sessions:
            items: bundles
            gather: {by: 'match-{session_id}', expect: {camera_id: [CAM_L, CAM_C, CAM_R]}}
            chain:
              - ship: {to: 'file://{tmp}/sessions/'}
        """)
    daemon(config)
    inbox = spool / "sessions" / "inbox"
    for camera in CAMERAS:
        bundle = inbox / f".{camera}.part"
        bundle.mkdir()
        (bundle / "recording.mp4").write_bytes(recording("S2", camera))
        (bundle / "manifest.json").write_text(json.dumps({"recording": {"camera_id": camera}}))
        (bundle / "recording.mp4.sha256").write_text("abc  recording.mp4\n")
        os.rename(bundle, inbox / f"S2_{camera}")
        marker = {"session_id": "S2", "camera_id": camera, "venue": "north", "hostname": f"cam-{camera[-1].lower()}"}
        (inbox / f"S2_{camera}.ready").write_text(json.dumps(marker))
    wait_for(sidecar_state(spool, "sessions", "match-S2", "done"), 15, "the group item done")
    group = read_sidecar(spool, "sessions", "match-S2") or {}
    assert group["fields"] == {"session_id": "S2", "venue": "north"}
    for camera in CAMERAS:
        folder = tmp_path / "sessions" / "match-S2" / camera
        assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "recording.mp4", "recording.mp4.sha256"]
        assert (folder / "recording.mp4").read_bytes() == recording("S2", camera)
        assert json.loads((folder / "manifest.json").read_text()) == {"recording": {"camera_id": camera}}
        member = wait_for(sidecar_state(spool, "sessions", f"S2_{camera}", "done"), 10, f"{camera} done")
        assert member["gather"]["item"] == "match-S2" and member["payload"] == []
        assert member["fields"]["hostname"] == f"cam-{camera[-1].lower()}"


def test_a_producer_waiting_on_its_member_sidecar_learns_when_the_group_is_done(
    tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start
) -> None:
    """Field note 002 in one spool: each camera's item ships into the gathering queue and waits on its member."""
    config = write_config("""\
        spool: {spool}
        rescan: 1s
        queues:
          recordings:
            settle: 0s
            fields: {pattern: '^(?P<session_id>.+)_(?P<camera_id>CAM_[LCR])\\.mp4$'}
            concurrency: 3
            chain:
              - checksum: {algorithms: [sha256], sumfile: true}
              - ship: {to: 'file://{spool}/sessions/inbox/'}
              - wait: {sidecar: 'file://{spool}/sessions/status/{name}.json', interval: 0.1s, timeout: 60s}
          sessions:
            items: bundles
            gather: {by: '{session_id}', expect: {camera_id: [CAM_L, CAM_C, CAM_R]}}
            chain:
              - exec: {argv: ['{tmp}/stitch', '{path}']}
        """)
    stitch = tmp_path / "stitch"
    stitch.write_text(f"#!{sys.executable}\nimport pathlib, sys\n"
                      "cams = sorted(p.name for p in pathlib.Path(sys.argv[1]).iterdir())\n"
                      f"pathlib.Path('{tmp_path}/stitched').write_text(' '.join(cams))\n")  # fmt: skip
    stitch.chmod(0o755)
    daemon(config)
    for camera, name in members("S3").items():
        drop(spool / "recordings" / "inbox", name, recording("S3", camera))
    for name in members("S3").values():
        pi = wait_for(sidecar_state(spool, "recordings", name, "done"), 30, f"{name} done on the camera's side")
        group = read_sidecar(spool, "sessions", "S3") or {}
        assert group["state"] == "done" and pi["updated"] >= group["updated"]
    assert (tmp_path / "stitched").read_text() == "CAM_C CAM_L CAM_R"
    folder = spool / "sessions" / "done" / "S3" / "S3" / "CAM_L"
    assert sorted(p.name for p in folder.iterdir()) == ["S3_CAM_L.mp4", "S3_CAM_L.mp4.sha256"]


def test_an_incomplete_group_times_out_and_retry_waits_again(tmp_path: Path, write_config: WriteConfig,
                                                             spool: Path, daemon: Start) -> None:  # fmt: skip
    config = files_config(write_config, "1s")
    process = daemon(config)
    inbox = spool / "sessions" / "inbox"
    names = members("GAME_3")
    for camera in ("CAM_L", "CAM_C"):
        drop(inbox, names[camera], recording("GAME_3", camera))
    for camera in ("CAM_L", "CAM_C"):
        failed = wait_for(sidecar_state(spool, "sessions", names[camera], "failed"), 10, f"{camera} timed out")
        assert failed["error"]["message"] == "group GAME_3 incomplete after 1s: missing CAM_R"
        assert failed["error"]["type"] == "incomplete" and failed["error"]["retryable"] is False
        assert (spool / "sessions" / "failed" / names[camera] / names[camera]).is_file()
    assert group_items(spool, "sessions", "GAME_3") == []

    files_config(write_config, "1h")
    process.signal(signal.SIGHUP)
    wait_for(lambda: "config reloaded" in process.log(), 10, "the reload")
    result = spoold_cli("retry", "-c", str(config), "sessions", "--all")
    assert result.returncode == 0 and result.stdout.count("queued again") == 2, result
    for camera in ("CAM_L", "CAM_C"):
        again = wait_for(waiting_with(spool, names[camera], ["CAM_L", "CAM_C"]), 10, f"{camera} waiting again")
        assert (parse_iso(again["gather"]["deadline"]) or 0) > time.time() + 1800, "a fresh deadline"
    drop(inbox, names["CAM_R"], recording("GAME_3", "CAM_R"))
    assert_gathered_once(spool, tmp_path, "GAME_3")
    assert process.stop() == 0


def test_members_fail_with_their_group_and_retry_on_a_member_retries_the_group(
    tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start
) -> None:
    text = """\
        spool: {spool}
        rescan: 1s
        queues:
          sessions:
            settle: 0s
            fields: {pattern: '^(?P<session_id>.+)_(?P<camera_id>CAM_[A-Z]+)\\.mp4$'}
            gather: {by: '{session_id}', expect: {camera_id: [CAM_L, CAM_C, CAM_R]}}
            retry: {attempts: 2, delays: [0s, 1s]}
            chain:
              - exec: {argv: [PYTHON, -c, 'import os, sys; sys.exit(0 if os.path.exists("{tmp}/ok") else 75)']}
        """
    config = write_config(text.replace("PYTHON", sys.executable))
    daemon(config)
    inbox = spool / "sessions" / "inbox"
    names = members("GAME_6")
    for camera, name in names.items():
        drop(inbox, name, recording("GAME_6", camera))
    wait_for(sidecar_state(spool, "sessions", "GAME_6", "retrying"), 15, "the group item retrying")
    # A camera of a group item that has not finished is a duplicate too.
    drop(inbox, "GAME_6_CAM_L.mp4", b"late")
    late = wait_for(sidecar_state(spool, "sessions", "GAME_6_CAM_L.1.mp4", "failed"), 10, "the late one rejected")
    assert "camera_id CAM_L is in group item GAME_6, not finished yet" in late["error"]["message"]
    group = wait_for(sidecar_state(spool, "sessions", "GAME_6", "failed"), 15, "the group item failed")
    assert "gave up after 2 attempts" in group["error"]["message"]
    for name in names.values():
        member = wait_for(sidecar_state(spool, "sessions", name, "failed"), 10, f"{name} failed with its group")
        assert member["error"]["type"] == group["error"]["type"] and member["error"]["retryable"] is False
        assert member["error"]["message"].startswith("group item GAME_6 failed: ")
        assert group["error"]["message"] in member["error"]["message"]
        assert (spool / "sessions" / "failed" / name).is_dir()

    # Retrying any member retries its group item; every member then follows it out of failed/.
    (tmp_path / "ok").touch()
    result = spoold_cli("retry", "-c", str(config), "sessions", names["CAM_C"])
    assert result.returncode == 0, result
    wait_for(sidecar_state(spool, "sessions", "GAME_6", "done"), 15, "the group item done after the retry")
    for name in names.values():
        member = wait_for(sidecar_state(spool, "sessions", name, "done"), 10, f"{name} done with its group")
        assert member["error"] is None and member["gather"]["item"] == "GAME_6"
        assert (spool / "sessions" / "done" / name).is_dir() and not (spool / "sessions" / "failed" / name).exists()
    assert [g["item"] for g in group_items(spool, "sessions", "GAME_6")] == ["GAME_6"]


# ---- kill -9 -------------------------------------------------------------------------------------------------


def test_kill_after_two_of_three_loses_nothing(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                               daemon: Start) -> None:  # fmt: skip
    config = files_config(write_config)
    process = daemon(config)
    inbox = spool / "sessions" / "inbox"
    names = members("GAME_4")
    drop(inbox, names["CAM_C"], recording("GAME_4", "CAM_C"))
    drop(inbox, names["CAM_L"], recording("GAME_4", "CAM_L"))
    before = wait_for(waiting_with(spool, names["CAM_C"], ["CAM_L", "CAM_C"]), 10, "two waiting")
    process.kill()
    daemon(config)
    after = wait_for(waiting_with(spool, names["CAM_L"], ["CAM_L", "CAM_C"]), 10, "both still waiting")
    assert after["gather"]["deadline"] == before["gather"]["deadline"], "the deadline survives a restart"
    drop(inbox, names["CAM_R"], recording("GAME_4", "CAM_R"))
    assert_gathered_once(spool, tmp_path, "GAME_4")


@pytest.mark.parametrize("kill_at", [
    "spoold.daemon.sidecar:Sidecar.gather_waiting:after:4",   # one member names the group item
    "spoold.daemon.sidecar:Sidecar.gather_waiting:after:6",   # all name it; nothing made yet
    "spoold.daemon.groupfiles:link_or_copy:after:2",          # staging half linked
    "spoold.daemon.groupfiles:adopt_orphan:before:1",         # renamed into work/, no sidecar
    "spoold.daemon.sidecar:Sidecar.mark_gathered:before:1",   # sidecar without its member list
    "spoold.daemon.gather:drop_member_data:before:1",         # members still hold their data
    "spoold.daemon.sidecar:Sidecar.gather_ended:after:1",     # one member followed its group item
])  # fmt: skip
def test_kill_while_forming_a_group_makes_it_exactly_once(kill_at: str, tmp_path: Path, write_config: WriteConfig,
                                                          spool: Path, daemon: Start) -> None:  # fmt: skip
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILL_HOOK)
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    config = files_config(write_config)
    process = daemon(config, env={"PYTHONPATH": python_path, "SPOOLD_TEST_KILL_AT": kill_at})
    inbox = spool / "sessions" / "inbox"
    assert process.process is not None
    child = process.process

    def placed_or_killed(name: str) -> bool:
        return child.poll() is not None or (read_sidecar(spool, "sessions", name) or {}).get("state") == "waiting"

    for camera, name in members("GAME_5").items():
        # One at a time, so each planted point is reached in the same order every run.
        if child.poll() is None:
            drop(inbox, name, recording("GAME_5", camera))
            wait_for(lambda n=name: placed_or_killed(n), 10, f"{name} placed")  # type: ignore[misc]
    wait_for(lambda: child.poll() is not None, 15, "the planted kill")
    assert child.returncode == -signal.SIGKILL, process.log()
    daemon(config)
    assert_gathered_once(spool, tmp_path, "GAME_5")
    assert [n for n in os.listdir(spool / "sessions" / "work")] == []


def test_kill_right_after_the_last_member_arrives_repeatedly(tmp_path: Path, write_config: WriteConfig,
                                                             spool: Path, daemon: Start) -> None:  # fmt: skip
    rng = random.Random(int(os.environ.get("SPOOLD_GATHER_SEED", "13")))
    config = files_config(write_config)
    process = daemon(config)
    inbox = spool / "sessions" / "inbox"
    sessions = [f"R{round_index}" for round_index in range(4)]
    for session in sessions:
        order = list(CAMERAS)
        rng.shuffle(order)
        for camera in order[:2]:
            drop(inbox, members(session)[camera], recording(session, camera))
        wait_for(waiting_with(spool, members(session)[order[1]], [c for c in CAMERAS if c in order[:2]]), 10,
                 f"{session}: two waiting")  # fmt: skip
        drop(inbox, members(session)[order[2]], recording(session, order[2]))
        time.sleep(rng.uniform(0.0, 0.15))  # places the kill, it does not wait for anything
        process.kill()
        if rng.random() < 0.5:
            process = daemon(config, wait=False)
            time.sleep(rng.uniform(0.05, 0.3))  # and sometimes again while it recovers (places the kill)
            process.kill()
        process = daemon(config)
    for session in sessions:
        assert_gathered_once(spool, tmp_path, session)


def test_a_group_item_whose_end_a_kill_cut_short_ends_its_members_after_the_restart(
    tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start,
) -> None:  # fmt: skip
    """A kill after the group item moved to done/ but before its sidecar said so: the sweep after the restart
    finishes it, and its members, which had been found waiting for it, must end with it."""
    config = files_config(write_config)
    process = daemon(config)
    inbox = spool / "sessions" / "inbox"
    for camera, member in members("S1").items():
        drop(inbox, member, recording("S1", camera))
    assert_gathered_once(spool, tmp_path, "S1")
    process.kill()
    # The state such a kill leaves: the group item in done/, its steps done, the item itself not yet done;
    # the members still in work/, waiting for it.
    status = spool / "sessions" / "status"
    group = json.loads((status / "S1.json").read_text())
    group.update(state="running", step="ship")
    (status / "S1.json").write_text(json.dumps(group))
    for member in members("S1").values():
        doc = json.loads((status / f"{member}.json").read_text())
        doc["state"] = doc["steps"][0]["state"] = "waiting"
        doc["step"] = "gather"
        (status / f"{member}.json").write_text(json.dumps(doc))
        os.rename(spool / "sessions" / "done" / member, spool / "sessions" / "work" / member)
    process = daemon(config)
    assert_gathered_once(spool, tmp_path, "S1")
    assert all(not (spool / "sessions" / "work" / m).exists() for m in members("S1").values())
