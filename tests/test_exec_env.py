"""Untrusted fields through the real daemon: exec's clean environment, names as options, built-ins, ship names."""

from __future__ import annotations

import json
import os
import pwd
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import DaemonProcess, read_sidecar, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]

DUMP_ENV = """\
import json, os, sys
with open(sys.argv[1], "w") as out:
    json.dump(dict(os.environ), out)
"""
RECORD = """\
import json, sys
from pathlib import Path
with open(Path(__file__).parent / "calls.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
"""
AWS_SECRET = "wJalrXUtnFEMI-test-secret-4711"
DB_PASSWORD = "db-password-test-0815"
NAMED = "named-value-for-the-child"
# What a child may see: the clean base, the SPOOLD_* variables and what the step's `env` names.
# (Python itself may add LC_CTYPE when it coerces a C locale.)
ALLOWED = {"PATH", "HOME", "LANG", "LC_ALL", "TZ", "LC_CTYPE", "SPOOLD_QUEUE", "SPOOLD_ITEM", "SPOOLD_ITEM_DIR",
           "SPOOLD_PAYLOAD", "MY_SETTING", "PASSED_ON"}  # fmt: skip


def finished(spool: Path, queue: str, item: str) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        doc = read_sidecar(spool, queue, item)
        return doc if doc and doc.get("state") in ("done", "failed") else None

    return check


def drop(inbox: Path, name: str, data: bytes) -> None:
    """Put a file into an inbox whole (written beside it under a hidden name, then renamed)."""
    tmp = inbox / f".{len(name)}-{os.getpid()}.tmp"
    tmp.write_bytes(data)
    os.rename(tmp, inbox / name)


def all_text_under(root: Path) -> str:
    parts = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            parts.append(path.read_bytes().decode("utf-8", "replace"))
    return "\n".join(parts)


def test_exec_children_get_a_clean_environment(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                               daemon: Start) -> None:  # fmt: skip
    dump = tmp_path / "dump_env.py"
    dump.write_text(DUMP_ENV)
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{dump}', '{{tmp}}/env.json'],
                       env: {{MY_SETTING: 'item={{name}}', PASSED_ON: $SPOOLD_TEST_NAMED}}}}
          missing:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{dump}', '{{tmp}}/never.json'],
                       env: {{X: $SPOOLD_TEST_NOT_SET_ANYWHERE}}}}
        """)
    secrets = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET, "MY_DB_PASSWORD": DB_PASSWORD,
               "CREDENTIALS_DIRECTORY": str(tmp_path / "creds"), "SPOOLD_TEST_NAMED": NAMED}  # fmt: skip
    process = daemon(config, env=secrets)
    drop(spool / "q" / "inbox", "job.txt", b"job")
    drop(spool / "missing" / "inbox", "job.txt", b"job")
    done = wait_for(finished(spool, "q", "job.txt"), 15, "exec step finished")
    assert done["state"] == "done", done["error"]
    child = json.loads((tmp_path / "env.json").read_text())
    for name in ("AWS_SECRET_ACCESS_KEY", "MY_DB_PASSWORD", "CREDENTIALS_DIRECTORY", "SPOOLD_TEST_NAMED"):
        assert name not in child, f"the child inherited {name}"
    assert AWS_SECRET not in json.dumps(child) and DB_PASSWORD not in json.dumps(child)
    assert set(child) <= ALLOWED, f"unexpected variables: {sorted(set(child) - ALLOWED)}"
    assert child["PATH"] == os.environ["PATH"]
    assert child["HOME"] == pwd.getpwuid(os.geteuid()).pw_dir
    assert child["LANG"] == (os.environ.get("LANG") or "C.UTF-8")
    assert child["MY_SETTING"] == "item=job.txt"
    assert child["PASSED_ON"] == NAMED, "`$NAME` in env passes the daemon's variable on"
    assert child["SPOOLD_ITEM"] == "job.txt" and child["SPOOLD_QUEUE"] == "q"

    failed = wait_for(finished(spool, "missing", "job.txt"), 15, "exec with a missing $VAR finished")
    assert failed["state"] == "failed" and failed["error"]["retryable"] is False
    assert "$SPOOLD_TEST_NOT_SET_ANYWHERE" in failed["error"]["message"]
    assert not (tmp_path / "never.json").exists()
    process.stop()
    assert AWS_SECRET not in process.log() + all_text_under(spool)
    assert DB_PASSWORD not in process.log() + all_text_under(spool)


def test_a_name_is_never_an_option(tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    record = tmp_path / "record.py"
    record.write_text(RECORD)
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          ls:
            settle: 0s
            chain:
              - exec: {{argv: [ls, '{{name}}']}}
          rec:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{record}', '{{name}}']}}
          dotslash:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{record}', -v, './{{name}}']}}
          allowed:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{record}', '{{name}}'], allow_dash_values: true}}
        """)
    process = daemon(config)
    for queue in ("ls", "rec", "dotslash", "allowed"):
        drop(spool / queue / "inbox", "--help", b"not an option")
    for queue in ("ls", "rec"):
        doc = wait_for(finished(spool, queue, "--help"), 15, f"{queue}: --help finished")
        assert doc["state"] == "failed" and doc["error"]["retryable"] is False
        message = doc["error"]["message"]
        assert "--help" in message and "option" in message and "allow_dash_values" in message, message
    # The program never ran for the refused items: only the `./` one and the opted-in one reached the recorder.
    for queue in ("dotslash", "allowed"):
        doc = wait_for(finished(spool, queue, "--help"), 15, f"{queue}: --help finished")
        assert doc["state"] == "done", doc["error"]
    calls = [json.loads(line) for line in (tmp_path / "calls.log").read_text().splitlines()]
    assert sorted(calls) == [["--help"], ["-v", "./--help"]], "a literal -v is fine; refused items never ran"
    assert "display this help" not in process.log(), "ls must not have run with --help"


def test_fields_cannot_replace_path(tmp_path: Path, write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    canary = tmp_path / "canary-secret.txt"
    canary.write_text("CANARY-9d1f3b-must-never-be-read\n")
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            chain:
              - exec: {argv: [cat, '{path}']}
          reqs:
            items: requests
            settle: 0s
            chain:
              - exec: {argv: [cat, '{path}']}
        """)
    process = daemon(config)
    inbox = spool / "q" / "inbox"
    # The marker is there before the file, so the claim reads its fields.
    (inbox / "shadow.txt.ready").write_text(json.dumps({"path": "/etc/shadow", "item_dir": "/etc"}))
    drop(inbox, "shadow.txt", b"PAYLOAD-shadow-item-own-bytes\n")
    (inbox / "canary.txt.ready").write_text(json.dumps({"path": str(canary), "name": str(canary)}))
    drop(inbox, "canary.txt", b"PAYLOAD-canary-item-own-bytes\n")
    drop(spool / "reqs" / "inbox", "r1.json", json.dumps({"path": "/etc/shadow", "name": "/etc/shadow"}).encode())
    for queue, item, own in (("q", "shadow.txt", "PAYLOAD-shadow-item-own-bytes"),
                             ("q", "canary.txt", "PAYLOAD-canary-item-own-bytes"), ("reqs", "r1", None)):  # fmt: skip
        doc = wait_for(finished(spool, queue, item), 15, f"{queue}/{item} finished")
        if doc["state"] == "done" and own is not None:
            # Not rejected: then the child read the item's own payload.
            wait_for(lambda own=own: own in process.log(), 10, f"{item}: cat printed its own payload")
        elif doc["state"] == "failed":
            assert doc["error"]["message"], doc
    process.stop()
    written = process.log() + all_text_under(spool)
    assert "CANARY-9d1f3b" not in written
    if os.access("/etc/shadow", os.R_OK):
        for line in Path("/etc/shadow").read_text(errors="replace").splitlines():
            if line.strip():
                assert line not in written, "/etc/shadow was read because of a field"


def test_ship_names_stay_inside_and_distinct(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                            daemon: Start) -> None:  # fmt: skip
    box = tmp_path / "box"
    (box / "canary").mkdir(parents=True)
    (box / "canary" / "keep.txt").write_text("untouched")
    config = write_config("""\
        spool: {spool}
        queues:
          folder:
            settle: 0s
            chain:
              - ship: {to: 'file://{tmp}/box/dest/'}
          templated:
            settle: 0s
            chain:
              - ship: {to: 'file://{tmp}/box/tdest/{name}'}
        """)
    daemon(config)
    # (A name starting with `.` is never picked up, so `..%2f...` cannot even be dropped.)
    names = ["a%2e%2e%2fx", "a#1", "a?1", "a%231", "%2e%2e%2fcanary%2fpwned", "%252e%252e%252fescaped",
             "%2E%2E%2Fescaped"]  # fmt: skip
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(spool)}
    for queue in ("folder", "templated"):
        for index, name in enumerate(names):
            drop(spool / queue / "inbox", name, f"{queue}-{index}".encode())
    for queue, dest in (("folder", box / "dest"), ("templated", box / "tdest")):
        for index, name in enumerate(names):
            doc = wait_for(finished(spool, queue, name), 15, f"{queue}/{name} finished")
            landed = dest / name
            if name in ("a%2e%2e%2fx", "a#1", "a?1", "a%231"):
                assert doc["state"] == "done", (queue, name, doc["error"])
                assert landed.read_bytes() == f"{queue}-{index}".encode(), f"{queue}: {name} must land as itself"
            elif doc["state"] == "done":
                assert landed.read_bytes() == f"{queue}-{index}".encode()
            else:
                assert doc["error"]["retryable"] is False and "escape" in doc["error"]["message"], doc["error"]
        # Two different names never share one file: every delivered file holds its own item.
        delivered = sorted(p.name for p in dest.iterdir())
        assert {"a%2e%2e%2fx", "a#1", "a?1", "a%231"} <= set(delivered)
    # Nothing was written outside the two destinations (and the daemon's own log).
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(spool)}
    outside = [
        p
        for p in after - before
        if not (p.is_relative_to(box / "dest") or p.is_relative_to(box / "tdest") or p.name.endswith(".log"))
    ]
    assert set(outside) <= {box / "dest", box / "tdest"}, outside
    assert sorted(p.name for p in (box / "canary").iterdir()) == ["keep.txt"]
    assert (box / "canary" / "keep.txt").read_text() == "untouched"
    assert not (box / "escaped").exists() and not (tmp_path / "escaped").exists()
