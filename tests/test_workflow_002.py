"""Field note 002 end to end: three Pi cameras ship their recordings (with the rig's manifest and a checksum
file) into the server's spool over a real sshd; the server gathers each session's three cameras, lays them out
as sessions/<session>/CAM_L|CAM_C|CAM_R/ and stitches them with ffmpeg; each Pi's item is done only once the
server's group is. The configs are etc/002-soccer-pi.yaml and etc/002-soccer-server.yaml, rendered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import DaemonProcess, read_sidecar, wait_for
from tests.sshd import Sshd, keygen
from tests.test_workflows import render_example, secrets_leaked, start_daemon

CAMERAS = ("CAM_L", "CAM_C", "CAM_R")

STITCH = """\
#!{python}
import pathlib, subprocess, sys
session = pathlib.Path(sys.argv[1])
inputs = []
for camera in ("CAM_L", "CAM_C", "CAM_R"):
    inputs += ["-i", str(next((session / camera).rglob("*.mp4")))]
subprocess.run(["ffmpeg", "-v", "error", "-y", *inputs, "-filter_complex", "hstack=inputs=3",
                str(session / "stitched.mp4")], check=True)
print("stitched", session.name)
"""


def make_recording(path: Path, seconds: float = 1.0) -> None:
    source = f"testsrc=size=64x48:rate=30:duration={seconds}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-c:v", "libx264", "-pix_fmt",
                    "yuv420p", str(path)], check=True)  # fmt: skip


def width_of(video: Path) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "stream=width",
                          "-of", "csv=p=0", str(video)], capture_output=True, text=True, check=True)  # fmt: skip
    return int(out.stdout.strip())


def test_002_three_cameras_gathered_checked_and_stitched(sshd: Sshd, ffmpeg: str, tmp_path: Path) -> None:
    server, sessions = tmp_path / "server", tmp_path / "sessions"
    stitch = tmp_path / "stitch"
    stitch.write_text(STITCH.format(python=sys.executable))
    stitch.chmod(0o755)
    (tmp_path / "server.yaml").write_text(render_example("002-soccer-server.yaml", [
        ("spool: /var/spool/spoold", f"spool: {server}"),
        ("timeout: 2h}", "timeout: 8s}"),
        ("file:///data/soccer-rig/sessions/", f"file://{sessions}/"),
        ("/usr/local/bin/stitch", str(stitch)),
        ("/data/soccer-rig/sessions/{session_id}", f"{sessions}/{{session_id}}"),
    ]))  # fmt: skip
    keys = []
    daemons: list[DaemonProcess] = []
    try:
        daemons.append(start_daemon(tmp_path / "server.yaml", server, tmp_path / "server.log"))
        pis = {}
        for camera in CAMERAS:
            key = tmp_path / f"{camera}_key"
            with open(sshd.root / "authorized_keys", "a") as authorized:
                authorized.write(keygen(key) + "\n")
            keys.append(key)
            spool = tmp_path / f"pi_{camera}"
            config = tmp_path / f"pi_{camera}.yaml"
            config.write_text(render_example("002-soccer-pi.yaml", [
                ("spool: /var/spool/spoold", f"spool: {spool}"),
                ("sftp://rig@server.lan'", f"sftp://{sshd.user}@127.0.0.1:{sshd.port}'"),
                ("/etc/spoold/rig_key", str(key)),
                ("/etc/spoold/known_hosts", str(sshd.known_hosts)),
                ("sftp://server/var/spool/spoold/", f"sftp://server{server}/"),
                ("delays: [0s, 5s, 10s, 20s, 40s]", "delays: [0s, 0.5s]"),
                ("interval: 10s", "interval: 0.2s"),
            ]))  # fmt: skip
            daemons.append(start_daemon(config, spool, tmp_path / f"pi_{camera}.log"))
            pis[camera] = spool
        # Session s1 is whole; session s2 never gets its right camera.
        for camera, spool in pis.items():
            for session in ("s1", "s2"):
                if session == "s2" and camera == "CAM_R":
                    continue
                recording = tmp_path / f"{session}_{camera}.mp4"
                make_recording(recording)
                os.rename(recording, spool / "recordings" / "inbox" / recording.name)

        def pi_state(camera: str, session: str) -> str | None:
            doc = read_sidecar(pis[camera], "recordings", f"{session}_{camera}.mp4")
            return doc["state"] if doc and doc["state"] in ("done", "failed") else None

        for camera in CAMERAS:
            wait_for(lambda c=camera: pi_state(c, "s1"), 90, f"{camera}'s s1 recording to end")  # type: ignore[misc]
        for camera in ("CAM_L", "CAM_C"):
            wait_for(lambda c=camera: pi_state(c, "s2"), 60, f"{camera}'s s2 recording to end")  # type: ignore[misc]
    finally:
        for process in daemons:
            process.stop()
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    for camera in CAMERAS:
        assert pi_state(camera, "s1") == "done", logs
    stitched = sessions / "s1" / "stitched.mp4"
    assert width_of(stitched) == 3 * 64
    for camera in CAMERAS:
        member = sessions / "s1" / camera
        names = sorted(p.name for p in member.rglob("*") if p.is_file())
        assert f"s1_{camera}.mp4" in names and "manifest.json" in names and f"s1_{camera}.mp4.sha256" in names
        manifest = json.loads(next(member.rglob("manifest.json")).read_text())
        assert json.dumps(manifest).count(camera) >= 1
    # Each Pi was done only after the server's group item was.
    group = read_sidecar(server, "sessions", "s1")
    assert group is not None and group["state"] == "done"
    for camera in CAMERAS:
        pi_doc: dict[str, Any] = read_sidecar(pis[camera], "recordings", f"s1_{camera}.mp4") or {}
        assert pi_doc["updated"] >= group["updated"]
    for camera in ("CAM_L", "CAM_C"):
        assert pi_state(camera, "s2") == "failed"
        member = read_sidecar(server, "sessions", f"s2_{camera}.mp4") or {}
        assert "CAM_R" in member["error"]["message"]
    assert not secrets_leaked(keys, [tmp_path])
