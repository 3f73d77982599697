"""Node to node (SPEC section 6): `ship` of a file with extras into another spool's inbox arrives there as ONE item,
with the sender's fields, over file:// and a real sshd; two real daemons. A plain folder still gets loose files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tests.conftest import sidecar_state, wait_for
from tests.sshd import Sshd

EXTRAS = (".manifest.json", ".sha256")


def drop(spool: Path, queue: str, name: str, data: bytes) -> None:
    inbox = spool / queue / "inbox"
    (inbox / f".{name}.tmp").write_bytes(data)
    os.rename(inbox / f".{name}.tmp", inbox / name)


def with_extras(name: str) -> list[str]:
    return sorted([name] + [name + extra for extra in EXTRAS])


def visible(folder: Path) -> list[str]:
    return sorted(p for p in os.listdir(folder) if not p.startswith("."))


def test_a_file_with_extras_reaches_a_far_spool_as_one_item(
    sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any
) -> None:
    far_spool = tmp_path / "far" / "spool"
    far_config = write_config(
        json.dumps({"spool": str(far_spool), "queues": {"episodes": {
            "items": "bundles", "ready": "marker", "settle": "0.1s", "chain": [{"checksum": {}}]}}}),
        name="far.yaml",
    )  # fmt: skip
    far = daemon(far_config, wait=False)
    far.wait_ready(far_spool)
    inbox = far_spool / "episodes" / "inbox"
    connection = {"identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)}
    plain, loose = tmp_path / "plain", tmp_path / "loose" / "inbox"
    destinations = {
        "by_file": {"to": f"file://{inbox}/"},
        "by_sftp": {"to": sshd.url(f"{inbox}/"), **connection},
        "plain": {"to": f"file://{plain}/"},
        "loose": {"to": f"file://{loose}/", "ready_marker": False},
    }
    queues = {
        queue: {
            "settle": "0.1s",
            "fields": {"pattern": r"^(?P<session>[a-z]+)_(?P<take>\d+)\.bin$"},
            "chain": [{"checksum": {"sumfile": True}}, {"manifest": {}}, {"ship": ship}],
        }
        for queue, ship in destinations.items()
    }
    daemon(write_config(json.dumps({"spool": "{spool}", "queues": queues})))
    payloads = {queue: os.urandom(200_000 + n) for n, queue in enumerate(destinations)}
    names = {queue: f"{queue.replace('_', '')}_{n}.bin" for n, queue in enumerate(destinations)}
    fields = {queue: {"session": queue.replace("_", ""), "take": str(n)} for n, queue in enumerate(destinations)}
    for queue in destinations:
        drop(spool, queue, names[queue], payloads[queue])

    for queue in ("by_file", "by_sftp"):
        name = names[queue]
        sent = wait_for(sidecar_state(spool, queue, name, "done"), 30, f"{queue} shipped")
        assert sent["fields"] == fields[queue]
        got = wait_for(sidecar_state(far_spool, "episodes", name, "done"), 30, f"{queue} arrived as an item")
        assert got["kind"] == "bundle" and got["fields"] == sent["fields"]
        folder = far_spool / "episodes" / "done" / name / got["payload"][0]
        assert visible(folder) == with_extras(name)
        assert (folder / name).read_bytes() == payloads[queue]
        digest = hashlib.sha256(payloads[queue]).hexdigest()
        assert (folder / f"{name}.sha256").read_text() == f"{digest}  {name}\n"
        manifest = json.loads((folder / f"{name}.manifest.json").read_text())
        assert manifest["fields"] == sent["fields"]
    # Exactly one item each: no manifest or checksum file became an item of its own, nothing was rejected.
    far_items = sorted(os.listdir(far_spool / "episodes" / "status"))
    assert far_items == sorted([f"{names['by_file']}.json", f"{names['by_sftp']}.json"])
    assert os.listdir(far_spool / "episodes" / "failed") == []
    assert visible(inbox) == []

    for queue, folder in (("plain", plain), ("loose", loose)):
        name = names[queue]
        wait_for(sidecar_state(spool, queue, name, "done"), 30, f"{queue} shipped")
        assert sorted(os.listdir(folder)) == with_extras(name), "side by side, and no marker"
        assert (folder / name).read_bytes() == payloads[queue]
    assert far.process.poll() is None


def test_a_bundle_with_a_manifest_keeps_its_shape_in_a_far_inbox(
    tmp_path: Path, spool: Path, daemon: Any, write_config: Any
) -> None:
    far_spool = tmp_path / "far" / "spool"
    far = daemon(write_config(json.dumps({"spool": str(far_spool), "queues": {"episodes": {
        "items": "bundles", "chain": [{"checksum": {}}]}}}), name="far.yaml"), wait=False)  # fmt: skip
    far.wait_ready(far_spool)
    ship = {"to": f"file://{far_spool / 'episodes' / 'inbox'}/"}
    daemon(write_config(json.dumps({"spool": "{spool}", "queues": {"episodes": {
        "items": "bundles", "chain": [{"checksum": {}}, {"manifest": {}}, {"ship": ship}]}}})))  # fmt: skip
    episode = spool / "episodes" / "inbox" / "ep1"
    frames = {f"cam_{side}/frame_{n:03d}.png": os.urandom(500) for side in ("left", "right") for n in range(3)}
    for relative, data in frames.items():
        (episode / relative).parent.mkdir(parents=True, exist_ok=True)
        (episode / relative).write_bytes(data)
    (spool / "episodes" / "inbox" / "ep1.ready").write_text(json.dumps({"robot": "r2"}))
    got = wait_for(sidecar_state(far_spool, "episodes", "ep1", "done"), 30, "the episode to arrive")
    assert got["fields"] == {"robot": "r2"}
    folder = far_spool / "episodes" / "done" / "ep1" / got["payload"][0]
    assert visible(folder) == ["cam_left", "cam_right", "ep1.manifest.json"], "no extra folder level"
    for relative, data in frames.items():
        assert (folder / relative).read_bytes() == data
