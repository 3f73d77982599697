"""Chains through the real daemon: retry, exec, ship to file://, min_free, secrets, health and metrics."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]

TOOL = """\
import json, os, sys, time
from pathlib import Path
here = Path(__file__).parent
mode = sys.argv[1]
with open(here / "calls.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
if mode == "tempfail":  # exit 75 until the flag file exists
    sys.exit(0 if (here / "fixed").exists() else 75)
if mode == "fail":  # exit 1 until the flag file exists
    if not (here / "fixed").exists():
        print("tool: broken input", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)
if mode == "fields":
    print("some chatter")
    print(json.dumps({"result_id": 7, "model_dir": "/m/x"}))
if mode == "sleep":
    time.sleep(30)  # a step that outlasts its timeout: not synchronisation
if mode == "leak":
    print("connecting with " + " ".join(sys.argv[2:]), file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    path = tmp_path / "tool.py"
    path.write_text(TOOL)
    return path


def calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def spoold(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True, timeout=30)


def exec_queue(write_config: WriteConfig, tool: Path, mode: str, extra: str = "") -> Path:
    return write_config(f"""\
spool: {{spool}}
queues:
  q:
    settle: 0s
    retry: {{attempts: 3, delays: [0s, 1s, 1s]}}
    chain:
      - exec: {{argv: ['{sys.executable}', '{tool}', {mode}]}}
{extra}""")


def test_exit_75_is_retried_then_fails(tmp_path: Path, tool: Path, write_config: WriteConfig, spool: Path,
                                       daemon: Start) -> None:  # fmt: skip
    daemon(exec_queue(write_config, tool, "tempfail"))
    (spool / "q" / "inbox" / "job.txt").write_text("job")
    retrying = wait_for(sidecar_state(spool, "q", "job.txt", "retrying"), 10, "retrying")
    assert retrying["next_attempt_at"] is not None
    assert retrying["error"]["retryable"] is True and retrying["error"]["step"] == "exec"
    assert "exit 75" in retrying["error"]["message"]
    failed = wait_for(sidecar_state(spool, "q", "job.txt", "failed"), 15, "failed after 3 attempts")
    assert failed["attempts"] == 3 and failed["next_attempt_at"] is None
    assert "gave up after 3 attempts" in failed["error"]["message"]
    assert len(calls(tmp_path)) == 3
    assert (spool / "q" / "failed" / "job.txt" / "job.txt").read_text() == "job"

    # The cause is fixed: `spoold retry QUEUE ITEM` brings it back and it completes.
    (tmp_path / "fixed").touch()
    result = spoold("retry", "-c", str(tmp_path / "spoold.yaml"), "q", "job.txt")
    assert result.returncode == 0, result.stderr
    done = wait_for(sidecar_state(spool, "q", "job.txt", "done"), 10, "done after retry")
    assert done["error"] is None
    assert (spool / "q" / "done" / "job.txt" / "job.txt").read_text() == "job"
    assert not (spool / "q" / "failed" / "job.txt").exists()


def test_exit_1_fails_at_once_and_retry_all(tmp_path: Path, tool: Path, write_config: WriteConfig, spool: Path,
                                            daemon: Start) -> None:  # fmt: skip
    daemon(exec_queue(write_config, tool, "fail"))
    for name in ("a.txt", "b.txt"):
        (spool / "q" / "inbox" / name).write_text(name)
    for name in ("a.txt", "b.txt"):
        failed = wait_for(sidecar_state(spool, "q", name, "failed"), 10, f"{name} failed")
        assert failed["attempts"] == 1 and failed["error"]["retryable"] is False
        assert "exit code 1" in failed["error"]["message"] and "broken input" in failed["error"]["message"]
    assert len(calls(tmp_path)) == 2
    not_failed = spoold("retry", "-c", str(tmp_path / "spoold.yaml"), "q", "nope.txt")
    assert not_failed.returncode != 0 and "Traceback" not in not_failed.stderr
    (tmp_path / "fixed").touch()
    result = spoold("retry", "-c", str(tmp_path / "spoold.yaml"), "q", "--all")
    assert result.returncode == 0 and result.stdout.count("queued again") == 2
    for name in ("a.txt", "b.txt"):
        wait_for(sidecar_state(spool, "q", name, "done"), 10, f"{name} done after retry --all")


def test_exec_templates_capture_fields_and_no_shell(tmp_path: Path, tool: Path, write_config: WriteConfig,
                                                    spool: Path, daemon: Start) -> None:  # fmt: skip
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            fields: {{pattern: '^(?P<prefix>[a-z]+)'}}
            chain:
              - checksum: {{}}
              - exec: {{argv: ['{sys.executable}', '{tool}', fields, '{{name}}', '{{path}}', '{{prefix}}',
                              'x-{{stem}}-{{ext}}', '{{sha256}}'], capture_fields: true}}
              - exec: {{argv: ['{sys.executable}', '{tool}', ok, '{{result_id}}', '{{model_dir}}']}}
        """)
    daemon(config)
    name = "evil; rm -rf $HOME; touch pwned `id` $(id).txt"
    (spool / "q" / "inbox" / name).write_text("payload")
    doc = wait_for(sidecar_state(spool, "q", name, "done"), 10, "exec chain done")
    assert doc["fields"] == {"prefix": "evil", "result_id": 7, "model_dir": "/m/x"}
    first, second = calls(tmp_path)
    sha = doc["steps"][0]["result"]["sha256"]
    stem = name.rsplit(".", 1)[0]
    assert first == ["fields", name, str(spool / "q" / "work" / name / name), "evil", f"x-{stem}-txt", sha]
    assert second == ["ok", "7", "/m/x"]
    assert not list(tmp_path.rglob("pwned*")), "a file name must never reach a shell"


def test_exec_timeout(tmp_path: Path, tool: Path, write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            retry: {{attempts: 1, delays: [0s]}}
            chain:
              - exec: {{argv: ['{sys.executable}', '{tool}', sleep], timeout: 1s}}
        """)
    daemon(config)
    started = time.monotonic()
    (spool / "q" / "inbox" / "slow.txt").write_text("z")
    failed = wait_for(sidecar_state(spool, "q", "slow.txt", "failed"), 15, "timed out")
    assert time.monotonic() - started < 10
    assert "timed out after 1s" in failed["error"]["message"]


def test_ship_file_folder_destination_verified(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                               daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            chain:
              - checksum: {algorithms: [sha256, md5], sumfile: true}
              - manifest: {}
              - ship: {to: 'file://{tmp}/dest/'}
          gone:
            settle: 0s
            chain:
              - checksum: {}
              - ship: {to: 'file://{tmp}/dest2/', delete_source: true}
        """)
    daemon(config)
    data = os.urandom(300_000)
    (spool / "q" / "inbox" / "clip.mp4").write_bytes(data)
    (spool / "gone" / "inbox" / "clip.mp4").write_bytes(data)
    doc = wait_for(sidecar_state(spool, "q", "clip.mp4", "done"), 10, "shipped")
    dest = tmp_path / "dest"
    assert (dest / "clip.mp4").read_bytes() == data
    assert sorted(os.listdir(dest)) == ["clip.mp4", "clip.mp4.manifest.json", "clip.mp4.sha256"]
    ship = doc["steps"][2]["result"]
    assert ship["verified"] is True and ship["bytes"] >= len(data)
    check = subprocess.run(["sha256sum", "-c", "clip.mp4.sha256"], cwd=dest, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # The sidecar says done a moment before the item folder moves to done/.
    wait_for(lambda: (spool / "q" / "done" / "clip.mp4" / "clip.mp4").exists(), 5, "payload kept in done/")

    wait_for(sidecar_state(spool, "gone", "clip.mp4", "done"), 10, "shipped with delete_source")
    wait_for(lambda: (spool / "gone" / "done" / "clip.mp4").is_dir(), 5, "item moved to done/")
    assert (tmp_path / "dest2" / "clip.mp4").read_bytes() == data
    assert not (spool / "gone" / "done" / "clip.mp4" / "clip.mp4").exists(), "delete_source removes the payload"
    assert not list(tmp_path.rglob("*.spoold.part"))


def test_ship_full_target_path_with_templates(tmp_path: Path, write_config: WriteConfig, spool: Path,
                                              daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            fields: {pattern: '^(?P<session_id>.+)_(?P<camera_id>CAM_[LCR])\\.mp4$'}
            chain:
              - checksum: {}
              - ship: {to: 'file://{tmp}/sessions/{session_id}/{camera_id}/recording.mp4'}
          b:
            items: bundles
            settle: 0s
            chain:
              - ship: {to: 'file://{tmp}/out/{dir}/x'}
        """)
    daemon(config)
    (spool / "q" / "inbox" / "s1_CAM_L.mp4").write_bytes(b"left")
    (spool / "q" / "inbox" / "s1_CAM_R.mp4").write_bytes(b"right")
    for cam, body in (("CAM_L", b"left"), ("CAM_R", b"right")):
        wait_for(sidecar_state(spool, "q", f"s1_{cam}.mp4", "done"), 10, f"{cam} shipped")
        assert (tmp_path / "sessions" / "s1" / cam / "recording.mp4").read_bytes() == body
    # A field holding `..` must not move the destination outside its base.
    (spool / "b" / "inbox" / "ep").mkdir()
    (spool / "b" / "inbox" / "ep" / "f").write_text("f")
    (spool / "b" / "inbox" / "ep.ready").write_text(json.dumps({"dir": "../../escaped"}))
    failed = wait_for(sidecar_state(spool, "b", "ep", "failed"), 10, "escape refused")
    assert failed["error"]["retryable"] is False and "escape" in failed["error"]["message"]
    assert not (tmp_path.parent / "escaped").exists() and not (tmp_path / "escaped").exists()


def test_min_free_pauses_intake(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        min_free: 1000TiB
        queues:
          q:
            settle: 0s
            chain: [checksum]
        """)
    process = daemon(config)
    health = json.loads((spool / "health.json").read_text())
    assert health["disk"]["intake_paused"] is True
    assert "paused" in health["status"]
    (spool / "q" / "inbox" / "waiting.txt").write_text("w")
    # The daemon gives no sign of an arrival it holds back; settle is 0s, so without the pause it is claimed at once.
    time.sleep(1.5)  # a window in which nothing may happen (a negative check), not synchronisation
    assert (spool / "q" / "inbox" / "waiting.txt").exists()
    assert read_sidecar(spool, "q", "waiting.txt") is None
    assert "spoold_intake_paused 1" in (spool / "metrics.prom").read_text()
    assert "intake paused" in process.log()


def test_secrets_never_written(tmp_path: Path, tool: Path, write_config: WriteConfig, spool: Path,
                               daemon: Start) -> None:  # fmt: skip
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          q:
            settle: 0s
            chain:
              - exec: {{argv: ['{sys.executable}', '{tool}', leak, 'password=hunter2',
                              'https://bob:s3cr3tpw@example.org/x', 'Authorization: Bearer tok3nvalue']}}
        """)
    process = daemon(config)
    (spool / "q" / "inbox" / "job.txt").write_text("job")
    failed = wait_for(sidecar_state(spool, "q", "job.txt", "failed"), 10, "leaky job failed")
    assert "***" in failed["error"]["message"]
    wait_for(lambda: json.loads((spool / "health.json").read_text()).get("last_error"), 10, "last_error in health")
    process.stop()
    written = process.log() + (spool / "q" / "status" / "job.txt.json").read_text()
    written += (spool / "health.json").read_text() + (spool / "metrics.prom").read_text()
    for secret in ("hunter2", "s3cr3tpw", "tok3nvalue"):
        assert secret not in written


def test_health_and_metrics(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("""\
        spool: {spool}
        queues:
          q:
            settle: 0s
            chain: [checksum]
          empty: {chain: [checksum]}
        """)
    process = daemon(config)
    (spool / "q" / "inbox" / "x.txt").write_text("x")
    wait_for(sidecar_state(spool, "q", "x.txt", "done"), 10, "done")
    health = wait_for(lambda: _health_with_done(spool), 10, "health counts the done item")
    assert health["schema"] == "spoold.health/1"
    assert health["pid"] == process.process.pid  # type: ignore[union-attr]
    assert health["version"] and health["ready"] is True
    for key in ("started", "heartbeat"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", health[key])
    assert set(health["queues"]) == {"q", "empty"}
    disk = health["disk"]
    assert disk["intake_paused"] is False
    assert any(isinstance(v, dict) and v.get("free_bytes", 0) > 0 for v in disk.values())
    assert "last_error" in health
    metrics = (spool / "metrics.prom").read_text()
    assert_prometheus_text(metrics)
    assert 'spoold_items{queue="q",state="done"} 1' in metrics


def _health_with_done(spool: Path) -> dict[str, object] | None:
    health = json.loads((spool / "health.json").read_text())
    return health if health["queues"].get("q", {}).get("done") == 1 else None


def assert_prometheus_text(text: str) -> None:
    assert text.endswith("\n")
    sample = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="[^"\\\n]*",?)*\})? -?[0-9.eE+-]+$')
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("gauge", "counter", "histogram", "summary", "untyped")
            typed.add(name)
        elif line.startswith("# HELP "):
            continue
        else:
            match = sample.match(line)
            assert match, f"not a Prometheus sample line: {line!r}"
            family = re.sub(r"_(bucket|sum|count)$", "", match.group(1))  # a histogram's samples
            assert match.group(1) in typed or family in typed, f"{match.group(1)} has no # TYPE line before it"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_daemon_sleeps(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    queues = "".join(f"  q{i}: {{chain: [checksum]}}\n" for i in range(10))
    process = daemon(write_config("spool: {spool}\nrescan: 2s\nqueues:\n" + queues))
    pid = process.process.pid  # type: ignore[union-attr]
    samples = [_cpu_seconds(pid)]

    def start_up_over() -> bool:  # its CPU time stood still for a sample's interval
        samples.append(_cpu_seconds(pid))
        return samples[-1] == samples[-2]

    wait_for(start_up_over, 10, "the daemon's start-up work to end", interval=0.2)
    before = _cpu_seconds(pid)
    first_beat = json.loads((spool / "health.json").read_text())["heartbeat"]
    time.sleep(3)  # the window measured: wall-clock time passing, not synchronisation
    used = _cpu_seconds(pid) - before
    assert used < 0.1, f"idle daemon used {used:.3f}s of CPU in 3s"
    wait_for(lambda: json.loads((spool / "health.json").read_text())["heartbeat"] != first_beat, 10,
             "heartbeat refreshed within 10s")  # fmt: skip


def test_sighup_reload_keeps_old_config_on_error(write_config: WriteConfig, spool: Path, daemon: Start) -> None:
    config = write_config("spool: {spool}\nqueues:\n  q: {settle: 0s, chain: [checksum]}\n")
    process = daemon(config)
    config.write_text(config.read_text() + "  broken: {chain: [nosuchhandler]}\n")
    process.signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in process.log(), 10, "reload failure logged")
    (spool / "q" / "inbox" / "a.txt").write_text("a")
    wait_for(sidecar_state(spool, "q", "a.txt", "done"), 10, "old config still works")
    write_config("spool: {spool}\nqueues:\n  q: {settle: 0s, chain: [checksum]}\n"
                 "  extra: {settle: 0s, chain: [checksum]}\n")  # fmt: skip
    process.signal(signal.SIGHUP)
    wait_for(lambda: (spool / "extra" / "inbox").is_dir(), 10, "new queue created on reload")
    (spool / "extra" / "inbox" / "b.txt").write_text("b")
    wait_for(sidecar_state(spool, "extra", "b.txt", "done"), 10, "new queue works")
    assert process.stop() == 0
