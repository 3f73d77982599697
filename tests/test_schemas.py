"""The JSON Schemas spoold ships (`spoold schema sidecar|health`) describe every document it writes.

Every test's sidecars and health.json are validated at its end (tests/conftest.py); these tests drive each
transition of a sidecar directly, and check that the schemas refuse what spoold never writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from spoold.daemon.sidecar import Sidecar, error_record
from spoold.fsio import now_iso
from tests.conftest import DaemonProcess


def schema(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(resources.files("spoold").joinpath("schemas", f"{name}.schema.json")
                                        .read_text(encoding="utf-8"))  # fmt: skip
    return loaded


def problems(name: str, document: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema(name))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def spoold(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name", ["sidecar", "health"])
def test_spoold_schema_prints_a_valid_draft_2020_12_schema(name: str) -> None:
    result = spoold("schema", name)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed == schema(name)
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(printed)


def test_an_unknown_schema_is_a_usage_error() -> None:
    result = spoold("schema", "manifest")
    assert result.returncode == 64, result
    assert "no schema named 'manifest'; schemas: sidecar, health" in result.stderr
    assert "Traceback" not in result.stderr


def sidecar(tmp_path: Path, steps: list[str], kind: str = "file") -> Sidecar:
    return Sidecar.new(tmp_path / "item.json", queue="q", item="item", original_name="item", kind=kind,
                       fields={"n": 1}, step_names=steps, host="h", payload=["item"])  # fmt: skip


def test_every_transition_writes_a_valid_sidecar(tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def check(doc: Sidecar) -> None:
        document = json.loads(doc.path.read_text())
        assert problems("sidecar", document) == [], (document, problems("sidecar", document))
        seen.append(document)

    item = sidecar(tmp_path, ["checksum", "fetch", "ship", "exec"])
    item.write()
    check(item)
    item.start_step(0)
    item.set_progress(0, {"bytes_done": 10, "bytes_total": 10})
    item.step_done(0, {"sha256": "ab"}, payload=None, extras=["item.sha256"], fields={"k": "v"})
    check(item)
    item.start_step(1)
    item.set_waiting(1, "free space on the spool", 0.0)
    check(item)
    item.set_progress(1, {"bytes_done": 5, "bytes_total": None, "rate_bps": 2, "eta_s": None, "files_done": 0,
                          "files_total": 3, "file": "a.bin"})  # fmt: skip
    item.write()
    check(item)
    item.retrying(1, error_record("fetch", "transient", "reset", retryable=True), 2, 0.0)
    check(item)
    item.start_step(1)
    item.step_entry(1)["checkpoint"] = {"files": {"a.bin": {"offset": 5}}}
    item.interrupted(1)
    check(item)
    item.start_step(1)
    item.step_done(1, {"files": ["a.bin"]}, payload=["a.bin"], extras=[], fields={})
    item.skipped(2, "size_below 1KiB: the payload is 2.0 KiB (2048 bytes)")
    item.start_step(3)
    item.set_progress(3, {"bytes_done": 0, "bytes_total": 0, "log_tail": ["epoch 1"], "job": "j1", "host": "gpu"})
    item.write()
    check(item)
    item.failed(3, error_record("exec", "permanent", "exited with 3", retryable=False))
    check(item)
    item.requeue()
    check(item)
    item.start_step(3)
    item.step_done(3, {}, payload=None, extras=[], fields={})
    item.done()
    check(item)
    assert {d["state"] for d in seen} == {"queued", "running", "waiting", "retrying", "failed", "done"}


def test_rejected_arriving_gathered_and_gather_members_are_valid(tmp_path: Path) -> None:
    rejected = sidecar(tmp_path / "r", ["checksum"], kind="request")
    (tmp_path / "r").mkdir()
    rejected.rejected("marker.ready is not valid JSON")
    arriving = sidecar(tmp_path / "a", ["encode"], kind="bundle")
    (tmp_path / "a").mkdir()
    arriving.mark_arriving()
    arriving.start_step(0)
    arriving.set_progress(0, {"bytes_done": 3, "bytes_total": 30, "unit": "frames",
                              "cameras": {"cam_left": {"frames_done": 3, "frames_total": 30}}})  # fmt: skip
    arriving.arrival_settled({"episode": 5})
    member = sidecar(tmp_path / "m", ["checksum"])
    (tmp_path / "m").mkdir()
    info = {"group": "GAME_1", "member": "CAM_L", "have": ["CAM_L"], "missing": ["CAM_R"], "deadline": now_iso(),
            "item": None}  # fmt: skip
    member.gather_waiting(info)
    documents = [json.loads(p.read_text()) for p in (rejected.path, arriving.path, member.path)]
    member.gather_ended("failed", error_record("gather", "incomplete", "CAM_R never came", retryable=False))
    group = sidecar(tmp_path / "g", ["ship"], kind="bundle")
    (tmp_path / "g").mkdir()
    group.doc["forwarded_from"] = "gather:GAME_1"
    group.mark_gathered({"group": "GAME_1", "members": {"CAM_L": "GAME_1_CAM_L.mp4"}})
    group.vanished()
    documents += [json.loads(p.read_text()) for p in (member.path, group.path)]
    for document in documents:
        assert problems("sidecar", document) == [], document


@pytest.mark.parametrize(("change", "where"), [
    ({"state": "stuck"}, "state"),
    ({"created": "2026-11-21 10:00:00"}, "created"),
    ({"kind": "folder"}, "kind"),
    ({"error": {"message": "no step, type or retryable"}}, "error"),
    ({"steps": [{"name": "ship", "state": "running", "progress": {"bytes_done": "lots"}}]}, "steps/0/progress"),
    ({"steps": [{"name": "ship", "state": "done", "history": [{"attempt": 0, "state": "done", "started": None}]}]},
     "steps/0/history/0/attempt"),
    ({"state": "retrying", "next_attempt_at": None}, "next_attempt_at"),
])  # fmt: skip
def test_the_sidecar_schema_refuses_what_spoold_never_writes(tmp_path: Path, change: dict[str, Any],
                                                              where: str) -> None:  # fmt: skip
    item = sidecar(tmp_path, ["ship"])
    item.write()
    document = {**json.loads(item.path.read_text()), **change}
    assert any(p.startswith(where) for p in problems("sidecar", document)), problems("sidecar", document)


def test_health_json_is_valid(write_config: Callable[..., Path], spool: Path,
                              daemon: Callable[..., DaemonProcess]) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            chain:
              - checksum: {}
        """)
    daemon(config)
    document = json.loads((spool / "health.json").read_text())
    assert problems("health", document) == []
    document["last_error"] = {"queue": "q", "item": "a", **error_record("ship", "permanent", "no", retryable=False),
                              "at": now_iso()}  # fmt: skip
    assert problems("health", document) == []
    assert problems("health", {**document, "ready": "yes"}) != []
    assert problems("health", {**document, "heartbeat": "now"}) != []
    assert problems("health", {**document, "queues": {"q": {"stuck": 1}}}) != []
