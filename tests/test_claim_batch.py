"""Claims made in one tick share one fsync of the status folder (issue 16: small items).

Each claimed sidecar is written (fsynced) at once, but the folder that names them is synced once for the
batch, before anything uses them: a worker starts, or a ready marker, which `adopt_orphan` would need to
make a sidecar lost to a crash again, is removed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from spoold.daemon import claiming
from spoold.daemon.config import parse_config
from spoold.daemon.layout import SpoolLayout
from spoold.daemon.queues import QueueBook
from spoold.fsio import fsync_dir


def test_a_batch_of_claims_syncs_the_status_folder_once_before_the_markers_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    config = parse_config(json.dumps({"spool": str(tmp_path / "spool"), "queues": {
        "q": {"settle": "0s", "items": "bundles", "chain": ["checksum"]}}}), "<test>")  # fmt: skip
    layout = SpoolLayout(config.spool, config.queues)
    layout.ensure()
    folders, queue = layout.queues["q"], config.queues["q"]
    book = QueueBook(config, queue, folders)
    bundles = [f"b{n:02d}" for n in range(12)]
    for name in bundles:
        (folders.inbox / name).mkdir()
        (folders.inbox / name / "frame.png").write_bytes(b"png")
        (folders.inbox / f"{name}.ready").write_text('{"session": "s1"}')
    synced: list[tuple[set[str], set[str]]] = []

    def spying_fsync_dir(folder: Path | str) -> None:
        if Path(folder) == folders.status:
            synced.append(({p.name for p in folders.status.glob("*.json")},
                           {p.name for p in folders.inbox.glob("*.ready")}))  # fmt: skip
        fsync_dir(folder)

    monkeypatch.setattr(claiming, "fsync_dir", spying_fsync_dir)
    now = time.monotonic()
    book.scan_inbox(now)
    book.take_arrivals(now + 5)
    everything = sorted(bundles)
    assert len(synced) == 1, f"{len(synced)} folder syncs for one batch of claims"
    sidecars, markers = synced[0]
    assert sidecars == {f"{name}.json" for name in everything}
    assert markers == {f"{name}.ready" for name in bundles}, "a marker went before its sidecar was durable"
    assert not list(folders.inbox.iterdir())
    assert sorted(book.pending) == everything
    assert all(json.loads(folders.sidecar_path(b).read_text())["fields"]["session"] == "s1" for b in bundles)
