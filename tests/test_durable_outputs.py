"""A step's files are on disk before its sidecar says done (found by `make torture`'s power case).

The manifest step wrote its file without an fsync and then recorded the step
done (durably); after a power cut the manifest was empty and the ship step
published that empty file. The daemon now fsyncs a step's outputs and extras
(and their folders) before the sidecar records the step done.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from tests.conftest import DaemonProcess, sidecar_state, wait_for

# Loaded by the daemon's interpreter (sitecustomize): notes every inode fsynced, and at each step_done
# which of the step's files had not been fsynced yet.
PATCH = """\
import json, os, threading
from spoold.daemon import runner, sidecar

REPORT = os.environ["SPOOLD_TEST_REPORT"]
synced, pending, real_fsync = set(), threading.local(), os.fsync

def fsync(fd):
    real_fsync(fd)
    st = os.fstat(fd)
    synced.add((st.st_dev, st.st_ino))

os.fsync = fsync
real_apply, real_done = runner.ItemRunner._apply, sidecar.Sidecar.step_done

def apply(self, ctx, index, result):
    pending.files = [*(result.outputs or []), *result.extras]
    return real_apply(self, ctx, index, result)

def step_done(self, *args, **kwargs):
    files = getattr(pending, "files", [])
    unsynced = [p.name for p in files if (os.stat(p).st_dev, os.stat(p).st_ino) not in synced]
    with open(REPORT, "a") as report:
        report.write(json.dumps({"files": [p.name for p in files], "unsynced": unsynced}) + "\\n")
    return real_done(self, *args, **kwargs)

runner.ItemRunner._apply, sidecar.Sidecar.step_done = apply, step_done
"""


def test_step_files_are_fsynced_before_the_step_is_done(
    tmp_path: Path, write_config: Callable[[str], Path], spool: Path, daemon: Callable[..., DaemonProcess]
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(PATCH)
    report = tmp_path / "report.jsonl"
    python_path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            chain:
              - checksum: {sumfile: true}
              - manifest: {}
        """)
    process = daemon(config, env={"PYTHONPATH": python_path, "SPOOLD_TEST_REPORT": str(report)})
    (spool / "q" / "inbox" / "x.bin").write_bytes(b"payload" * 1000)
    wait_for(sidecar_state(spool, "q", "x.bin", "done"), 20, "x.bin done")
    process.stop()
    lines = [json.loads(line) for line in report.read_text().splitlines()]
    written = [line for line in lines if line["files"]]
    assert sorted(f for line in written for f in line["files"]) == ["x.bin.manifest.json", "x.bin.sha256"]
    assert [line["unsynced"] for line in written] == [[], []]
