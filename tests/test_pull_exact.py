"""`pull` with an exact target: `to` without a trailing `/` is the path that receives the file or the folder's
contents (SPEC section 6, field note 000), atomically, over file:// and a real sshd, run by the real daemon."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonProcess, sidecar_state, wait_for
from tests.sshd import Sshd

MiB = 1 << 20
PART = ".spoold.part"


def tree(root: Path) -> dict[str, bytes | None]:
    """Relative path -> bytes (None for a folder) of everything below `root`."""
    found: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        found[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return found


def drop(spool: Path, queue: str, name: str, fields: dict[str, Any]) -> None:
    inbox = spool / queue / "inbox"
    (inbox / f".{name}.tmp").write_text(json.dumps(fields))
    os.rename(inbox / f".{name}.tmp", inbox / name)


class Setup:
    """A source folder, a landing area and a daemon whose queues pull from the source in each way."""

    run: DaemonProcess

    def __init__(self, tmp_path: Path, spool: Path, url: Callable[[str], str], connection: dict[str, str]) -> None:
        self.spool = spool
        self.source = tmp_path / "remote" / "runs" / "run1"  # named unlike any target, so a kept name shows
        (self.source / "sub").mkdir(parents=True)
        (self.source / "config.json").write_text('{"layers": 2}')
        (self.source / "weights.bin").write_bytes(os.urandom(6 * MiB + 3))
        (self.source / "sub" / "tokenizer.txt").write_text("a b c")
        self.out = tmp_path / "out"
        # `from` is fixed, so a field's trouble in `to` is what each test sees.
        self.steps = {
            "exact_dir": {"from": url(f"{self.source}/"), "to": f"file://{self.out}/models/{{repo_id}}"},
            "exact_file": {"from": url(f"{self.source}/weights.bin"), "to": f"file://{self.out}/files/{{repo_id}}/w.bin"},
            "folder": {"from": url(f"{self.source}/"), "to": f"file://{self.out}/keep/"},
        }  # fmt: skip
        retry = {"attempts": 1, "delays": ["0s"]}
        self.queues = {
            queue: {"items": "requests", "settle": "0s", "retry": retry, "chain": [{"pull": {**step, **connection}}]}
            for queue, step in self.steps.items()
        }
        self.count = 0

    def pull(self, queue: str, repo_id: str, state: str = "done") -> dict[str, Any]:
        self.count += 1
        drop(self.spool, queue, f"r{self.count}.json", {"repo_id": repo_id})
        doc: dict[str, Any] = wait_for(
            sidecar_state(self.spool, queue, f"r{self.count}", state), 30, f"{queue} {state}"
        )
        return doc


@pytest.fixture(params=["file", "sftp"])
def setup(request: pytest.FixtureRequest, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> Setup:
    if request.param == "sftp":
        sshd: Sshd = request.getfixturevalue("sshd")
        made = Setup(tmp_path, spool, sshd.url, {"identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)})
    else:
        made = Setup(tmp_path, spool, lambda path: f"file://{path}", {})
    made.run = daemon(write_config(json.dumps({"spool": "{spool}", "queues": made.queues})))
    return made


def test_exact_folder_target_holds_the_contents_and_appears_whole(setup: Setup) -> None:
    target = setup.out / "models" / "demo"
    expected = tree(setup.source)
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Whenever the target is visible it must already be the whole tree (so no part name inside either).
        while True:
            is_last = stop.is_set()  # one more look after the pull is done, so there is always one
            if target.exists():
                snapshot = tree(target)
                seen.append("whole" if snapshot == expected else f"partial: {sorted(snapshot)}")
            if is_last:
                return

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        doc = setup.pull("exact_dir", "demo")
    finally:
        stop.set()
        watcher.join(10)
    assert tree(target) == expected
    assert sorted(os.listdir(target)) == ["config.json", "sub", "weights.bin"], "no extra folder level"
    assert sorted(os.listdir(setup.out / "models")) == ["demo"], "the part name is gone"
    assert seen and set(seen) == {"whole"}, seen[:5]
    assert doc["steps"][0]["result"]["to"] == [str(target)]


def test_exact_file_target_and_a_trailing_slash_keeps_the_name(setup: Setup) -> None:
    setup.pull("exact_file", "demo")
    target = setup.out / "files" / "demo" / "w.bin"
    assert target.read_bytes() == (setup.source / "weights.bin").read_bytes()
    assert sorted(os.listdir(target.parent)) == ["w.bin"]
    setup.pull("folder", "demo")
    assert sorted(os.listdir(setup.out / "keep")) == ["run1"], "a folder `to` keeps the pulled name"
    assert tree(setup.out / "keep" / "run1") == tree(setup.source)
    assert not [p for p in setup.out.rglob("*") if PART in p.name]


def test_a_rerun_replaces_the_earlier_copy_whole(setup: Setup) -> None:
    setup.pull("exact_dir", "demo")
    setup.pull("exact_file", "demo")
    (setup.source / "sub" / "tokenizer.txt").unlink()
    (setup.source / "weights.bin").write_bytes(b"retrained")
    (setup.source / "new.txt").write_text("new")
    setup.pull("exact_dir", "demo")
    setup.pull("exact_file", "demo")
    assert tree(setup.out / "models" / "demo") == tree(setup.source), "a file gone from the source is gone here too"
    assert (setup.out / "files" / "demo" / "w.bin").read_bytes() == b"retrained"
    assert sorted(os.listdir(setup.out / "models")) == ["demo"]
    assert not [p for p in setup.out.rglob("*") if ".spoold." in p.name]


def test_a_file_never_replaces_a_folder_nor_a_folder_a_file(setup: Setup) -> None:
    clash = setup.out / "files" / "clash" / "w.bin"
    (clash / "mine").mkdir(parents=True)
    doc = setup.pull("exact_file", "clash", "failed")
    assert "is a folder; a pulled file does not replace it" in doc["error"]["message"], doc["error"]
    assert doc["error"]["retryable"] is False
    assert clash.is_dir() and os.listdir(clash) == ["mine"]
    occupied = setup.out / "models" / "occupied"
    occupied.parent.mkdir(parents=True)
    occupied.write_text("keep me")
    doc = setup.pull("exact_dir", "occupied", "failed")
    assert "a pulled folder does not replace it" in doc["error"]["message"], doc["error"]
    assert occupied.read_text() == "keep me"
    assert not [p for p in setup.out.rglob("*") if p.name.endswith(".spoold.old")]


def test_a_field_cannot_climb_out_of_the_target(setup: Setup) -> None:
    for repo_id in ("../x", "%2e%2e/x", "a/../../x"):
        doc = setup.pull("exact_dir", repo_id, "failed")
        assert "would escape" in doc["error"]["message"], doc["error"]
        assert doc["error"]["retryable"] is False
    assert not setup.out.exists(), sorted(setup.out.rglob("*"))
    assert setup.run.process.poll() is None
