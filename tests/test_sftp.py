"""sftp:// against a real OpenSSH sshd on loopback: ship, resume, verification, host keys, wait, pull."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import read_sidecar, sidecar_state, wait_for
from tests.netproxy import Proxy
from tests.sshd import Sshd, keygen

MiB = 1 << 20


def ship_config(write_config: Callable[..., Path], sshd: Sshd, dest: Path, **overrides: Any) -> Path:
    options = {"to": sshd.url(f"{dest}/"), "identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)}
    options.update(overrides)
    return write_config(f"""
        spool: {{spool}}
        queues:
          files:
            settle: 0.2s
            retry: {{attempts: 3, delays: [0s, 0.2s]}}
            chain:
              - checksum: {{}}
              - ship: {json.dumps(options)}
          bundles:
            items: bundles
            chain:
              - checksum: {{}}
              - ship: {json.dumps(options)}
        """)


def drop(spool: Path, queue: str, name: str, data: bytes) -> None:
    inbox = spool / queue / "inbox"
    (inbox / f".{name}.tmp").write_bytes(data)
    os.rename(inbox / f".{name}.tmp", inbox / name)


def step(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in doc["steps"] if s["name"] == name)


def test_ship_file_and_bundle(sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    dest = tmp_path / "remote" / "inbox"
    run = daemon(ship_config(write_config, sshd, dest))
    payload = os.urandom(3 * MiB + 17)
    drop(spool, "files", "clip.bin", payload)
    bundle = spool / "bundles" / "inbox" / "episode_1"
    (bundle / "cam").mkdir(parents=True)
    (bundle / "cam" / "0001.png").write_bytes(b"frame-1")
    (bundle / "meta.json").write_text("{}")
    (spool / "bundles" / "inbox" / "episode_1.ready").write_text(json.dumps({"repo_id": "demo"}))
    doc = wait_for(sidecar_state(spool, "files", "clip.bin", "done"), 30, "file shipped")
    assert (dest / "clip.bin").read_bytes() == payload
    assert step(doc, "ship")["result"]["verified"] is True
    assert step(doc, "ship")["result"]["remote_path"] == str(dest / "clip.bin")
    wait_for(sidecar_state(spool, "bundles", "episode_1", "done"), 30, "bundle shipped")
    assert (dest / "episode_1" / "cam" / "0001.png").read_bytes() == b"frame-1"
    assert json.loads((dest / "episode_1.ready").read_text()) == {"repo_id": "demo"}
    assert not [p for p in dest.iterdir() if p.name.startswith(".")], "temp names left behind"
    assert run.process.poll() is None


def test_resume_after_connection_cut(sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    proxy = Proxy(sshd.port, cut_after=4 * MiB)
    try:
        known_hosts = tmp_path / "known_hosts_proxy"
        known_hosts.write_text(sshd.known_hosts_line(proxy.port))
        dest = tmp_path / "remote"
        config = ship_config(write_config, sshd, dest, to=sshd.url(f"{dest}/", port=proxy.port),
                             known_hosts=str(known_hosts))  # fmt: skip
        run = daemon(config)
        payload = os.urandom(12 * MiB)
        drop(spool, "files", "big.bin", payload)
        doc = wait_for(sidecar_state(spool, "files", "big.bin", "done"), 60, "shipped after the cut")
        assert (dest / "big.bin").read_bytes() == payload
        assert step(doc, "ship")["attempt"] == 2
        assert proxy.connections >= 2
        resumed = re.search(r"resuming upload at (\d+) of", run.log())
        assert resumed and int(resumed.group(1)) >= MiB, run.log()
        # A restart from zero would have sent the whole 4 MiB before the cut again.
        assert proxy.upstream_bytes < len(payload) + 4 * MiB
    finally:
        proxy.close()


def test_a_connection_that_timed_out_is_not_reused(
    sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any
) -> None:
    """A link blackholed with its TCP connection open: the attempt times out (30 s, the I/O floor), and the
    next attempt must open a new connection instead of waiting on the wedged one again."""
    proxy = Proxy(sshd.port)
    try:
        known_hosts = tmp_path / "known_hosts_proxy"
        known_hosts.write_text(sshd.known_hosts_line(proxy.port))
        dest = tmp_path / "remote"
        daemon(ship_config(write_config, sshd, dest, to=sshd.url(f"{dest}/", port=proxy.port),
                           known_hosts=str(known_hosts)))  # fmt: skip
        drop(spool, "files", "first.bin", b"first")
        wait_for(sidecar_state(spool, "files", "first.bin", "done"), 30, "first item shipped")
        proxy.wedge()
        payload = os.urandom(MiB)
        drop(spool, "files", "second.bin", payload)
        doc = wait_for(sidecar_state(spool, "files", "second.bin", "done"), 80, "shipped on a new connection")
        assert (dest / "second.bin").read_bytes() == payload
        assert step(doc, "ship")["attempt"] == 2, "one timed-out attempt, then a new connection"
        assert proxy.connections >= 2
    finally:
        proxy.close()


def test_corrupted_partial_is_sent_again(
    sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any
) -> None:
    dest = tmp_path / "remote"
    dest.mkdir()
    payload = os.urandom(5 * MiB)
    partial = bytearray(payload[: 2 * MiB])
    partial[1000] ^= 0xFF
    (dest / ".data.bin.spoold.part").write_bytes(partial)
    run = daemon(ship_config(write_config, sshd, dest))
    drop(spool, "files", "data.bin", payload)
    doc = wait_for(sidecar_state(spool, "files", "data.bin", "done"), 30, "shipped")
    assert (dest / "data.bin").read_bytes() == payload
    assert step(doc, "ship")["attempt"] == 1, "the bad prefix must be caught before sending, not by verification"
    assert "does not match the local file" in run.log()


def test_wrong_host_key_fails_permanently(
    sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any
) -> None:
    other = keygen(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts_wrong"
    known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {other}\n")
    dest = tmp_path / "remote"
    daemon(ship_config(write_config, sshd, dest, known_hosts=str(known_hosts)))
    drop(spool, "files", "x.bin", b"secret data")
    doc = wait_for(sidecar_state(spool, "files", "x.bin", "failed"), 30, "failed")
    error = doc["error"]
    assert error["retryable"] is False
    assert f"[127.0.0.1]:{sshd.port}" in error["message"] and "SHA256:" in error["message"]
    assert step(doc, "ship")["attempt"] == 1
    assert not dest.exists()


def test_tofu_records_the_key(sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    known_hosts = tmp_path / "fresh" / "known_hosts"
    dest = tmp_path / "remote"
    daemon(ship_config(write_config, sshd, dest, known_hosts=str(known_hosts), host_key="tofu"))
    drop(spool, "files", "a.bin", b"a")
    wait_for(sidecar_state(spool, "files", "a.bin", "done"), 30, "shipped")
    assert known_hosts.read_text() == sshd.known_hosts_line()
    drop(spool, "files", "b.bin", b"b")
    wait_for(sidecar_state(spool, "files", "b.bin", "done"), 30, "shipped with the recorded key")
    assert known_hosts.read_text() == sshd.known_hosts_line()


def request_config(write_config: Callable[..., Path], sshd: Sshd | None, steps: dict[str, dict[str, Any]]) -> Path:
    """Queues of requests, each with one step (sshd's connection options added), plus a `landing` queue."""
    connection = {"identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)} if sshd else {}
    queues: dict[str, Any] = {"landing": {"chain": [{"checksum": {}}]}}
    for queue, one_step in steps.items():
        ((name, options),) = one_step.items()
        queues[queue] = {"items": "requests", "settle": "0.1s", "chain": [{name: {**options, **connection}}]}
    return write_config(json.dumps({"spool": "{spool}", "queues": queues}))


def test_wait_for_a_remote_path(sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    base = tmp_path / "remote" / "jobs"
    pattern = sshd.url(f"{base}/{{job}}/checkpoints/*/model")
    daemon(request_config(write_config, sshd, {"waits": {"wait": {"path": pattern, "interval": "0.2s"}}}))
    drop(spool, "waits", "j1.json", json.dumps({"job": "j1"}).encode())
    doc = wait_for(sidecar_state(spool, "waits", "j1", "waiting"), 30, "waiting")
    assert "checkpoints" in step(doc, "wait")["waiting"]["for"]
    for index, stamp in (("002", 2_000_000_000), ("001", 1_000_000_000)):
        (base / "j1" / "checkpoints" / index).mkdir(parents=True)
        (base / "j1" / "checkpoints" / index / "model").write_text(index)
        os.utime(base / "j1" / "checkpoints" / index / "model", (stamp, stamp))
    doc = wait_for(sidecar_state(spool, "waits", "j1", "done"), 30, "done")
    assert doc["fields"]["found"] == str(base / "j1" / "checkpoints" / "002" / "model")


def test_wait_on_a_far_sidecar(sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    far = tmp_path / "far" / "episodes" / "status"
    far.mkdir(parents=True)
    url = sshd.url(f"{far}/{{name}}.json")
    chain = {"wait": {"sidecar": url, "import": ["transaction_id", "model_dir"], "interval": "0.2s"}}
    daemon(request_config(write_config, sshd, {"follow": chain}))
    (far / "ok.json").write_text(json.dumps({"item": "ok", "state": "running", "fields": {}}))
    (far / "bad.json").write_text(json.dumps({"queue": "episodes", "item": "bad", "state": "failed",
                                              "error": {"step": "encode", "message": "ffmpeg exited 1"}}))  # fmt: skip
    drop(spool, "follow", "ok.json", b"{}")
    drop(spool, "follow", "bad.json", b"{}")
    wait_for(sidecar_state(spool, "follow", "ok", "waiting"), 30, "waiting on the far item")
    far_doc = {"item": "ok", "state": "done", "fields": {"transaction_id": "t-42", "model_dir": "/models/42"}}
    (far / ".ok.tmp").write_text(json.dumps(far_doc))
    os.rename(far / ".ok.tmp", far / "ok.json")
    doc = wait_for(sidecar_state(spool, "follow", "ok", "done"), 30, "done")
    assert doc["fields"]["transaction_id"] == "t-42" and doc["fields"]["model_dir"] == "/models/42"
    bad = wait_for(sidecar_state(spool, "follow", "bad", "failed"), 30, "failed")
    assert bad["error"]["retryable"] is False and "ffmpeg exited 1" in bad["error"]["message"]


def test_pull_a_remote_folder(sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    remote = tmp_path / "remote" / "runs" / "run1"
    (remote / "sub").mkdir(parents=True)
    (remote / "weights.bin").write_bytes(os.urandom(2 * MiB))
    (remote / "sub" / "log.txt").write_text("ok")
    url = sshd.url(f"{remote.parent}/{{run}}/")
    local = tmp_path / "pulled"
    daemon(request_config(write_config, sshd, {
        "to_folder": {"pull": {"from": url, "to": f"file://{local}/"}},
        "to_queue": {"pull": {"from": url, "to": "queue:landing"}},
    }))  # fmt: skip
    drop(spool, "to_folder", "r.json", json.dumps({"run": "run1"}).encode())
    drop(spool, "to_queue", "q.json", json.dumps({"run": "run1"}).encode())
    wait_for(sidecar_state(spool, "to_folder", "r", "done"), 30, "pulled into a folder")
    assert (local / "run1" / "weights.bin").read_bytes() == (remote / "weights.bin").read_bytes()
    assert (local / "run1" / "sub" / "log.txt").read_text() == "ok"
    assert [p.name for p in local.iterdir()] == ["run1"]
    doc = wait_for(sidecar_state(spool, "landing", "run1", "done"), 30, "pulled into a queue")
    assert doc["fields"] == {"run": "run1"}
    landed = read_sidecar(spool, "to_queue", "q")
    assert landed is not None and step(landed, "pull")["result"]["item"] == "run1"


def test_wait_over_file_urls(tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:
    flag = f"file://{tmp_path}/flags/{{job}}/done.flag"
    far = f"file://{tmp_path}/far/{{name}}.json"
    daemon(request_config(write_config, None, {
        "flags": {"wait": {"path": flag, "interval": "0.1s", "timeout": "3s"}},
        "sidecars": {"wait": {"sidecar": far, "import": ["answer"], "interval": "0.1s"}},
    }))  # fmt: skip
    drop(spool, "flags", "one.json", json.dumps({"job": "one"}).encode())
    drop(spool, "flags", "never.json", json.dumps({"job": "never"}).encode())
    drop(spool, "sidecars", "s.json", b"{}")
    wait_for(sidecar_state(spool, "flags", "one", "waiting"), 30, "waiting")
    (tmp_path / "flags" / "one").mkdir(parents=True)
    (tmp_path / "flags" / "one" / "done.flag").write_text("")
    doc = wait_for(sidecar_state(spool, "flags", "one", "done"), 30, "done")
    assert doc["fields"]["found"] == str(tmp_path / "flags" / "one" / "done.flag")
    (tmp_path / "far").mkdir()
    (tmp_path / "far" / "s.json").write_text(json.dumps({"state": "done", "fields": {"answer": 42}}))
    assert wait_for(sidecar_state(spool, "sidecars", "s", "done"), 30, "done")["fields"]["answer"] == 42
    failed = wait_for(sidecar_state(spool, "flags", "never", "failed"), 30, "timed out")
    assert "timed out after 3s" in failed["error"]["message"] and failed["error"]["retryable"] is False
