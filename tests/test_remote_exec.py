"""exec with remote: (and detach:) against a real OpenSSH sshd on loopback, run by the real daemon."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import parse_config
from spoold.errors import ConfigError
from spoold.handlers import remote_exec
from tests.conftest import read_sidecar, sidecar_state, wait_for
from tests.netproxy import Proxy
from tests.sshd import Sshd

JOBS = Path.home() / remote_exec.JOBS_FOLDER
HOSTILE = {
    "spaces": "a b  c",
    "quote": 'it\'s "quoted"',
    "semicolon": "x; touch PWNED_SEMI",
    "subshell": "$(touch PWNED_SUB)`touch PWNED_TICK`",
    "newline": "line1\nline2; touch PWNED_NL",
    "glob": "*",
    "empty": "",
}


@pytest.fixture
def jobs() -> Iterator[None]:
    """The sshd's user is this test's user, so jobs land in its ~/.spoold/jobs: remove the ones a test made."""
    before = set(os.listdir(JOBS)) if JOBS.is_dir() else set()
    yield
    for name in set(os.listdir(JOBS)) - before if JOBS.is_dir() else ():
        shutil.rmtree(JOBS / name, ignore_errors=True)


def exec_config(write_config: Callable[..., Path], sshd: Sshd, step: dict[str, Any], port: int | None = None,
                retry: str = "{attempts: 2, delays: [0s, 0.2s]}") -> Path:  # fmt: skip
    options = {"remote": f"ssh://{sshd.user}@127.0.0.1:{port or sshd.port}", "identity": str(sshd.identity),
               "known_hosts": str(sshd.known_hosts), **step}  # fmt: skip
    return write_config(f"""
        spool: {{spool}}
        queues:
          jobs:
            items: requests
            settle: 0.1s
            retry: {retry}
            chain:
              - exec: {json.dumps(options)}
        """)


def drop_request(spool: Path, name: str, fields: dict[str, Any]) -> None:
    inbox = spool / "jobs" / "inbox"
    (inbox / f".{name}.tmp").write_text(json.dumps(fields))
    os.rename(inbox / f".{name}.tmp", inbox / f"{name}.json")


def test_every_argv_element_reaches_the_far_program_as_one_word(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path
) -> None:
    argv = ["python3", "-c", "import json, sys; print(json.dumps(dict(got=sys.argv[1:])))",
            *[f"{{{name}}}" for name in HOSTILE]]  # fmt: skip
    config = exec_config(write_config, sshd, {"argv": argv, "cwd": str(tmp_path), "capture_fields": True})
    daemon(config)
    drop_request(spool, "quoting", HOSTILE)
    doc = wait_for(sidecar_state(spool, "jobs", "quoting", "done"), 30, "the remote command")
    assert doc["fields"]["got"] == list(HOSTILE.values())
    assert not list(tmp_path.glob("PWNED*")), "a field's value ran as shell code on the far host"


def test_a_field_cannot_add_an_option(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path
) -> None:
    daemon(exec_config(write_config, sshd, {"argv": ["ls", "{target}"]}))
    drop_request(spool, "dash", {"target": "--help"})
    doc = wait_for(sidecar_state(spool, "jobs", "dash", "failed"), 30, "the refusal")
    assert "-" in doc["error"]["message"] and doc["error"]["retryable"] is False


def test_exit_codes_env_cwd_and_output_in_the_log(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path
) -> None:
    script = 'pwd; echo "value=$GREETING item=$SPOOLD_ITEM"; echo "oops: $1" >&2; exit "$1"'
    step = {"argv": ["sh", "-c", script, "sh", "{code}"], "cwd": str(tmp_path), "env": {"GREETING": "hello {who}"}}
    process = daemon(exec_config(write_config, sshd, step))
    drop_request(spool, "ok", {"code": "0", "who": "far side"})
    drop_request(spool, "later", {"code": "75", "who": "x"})
    drop_request(spool, "bad", {"code": "3", "who": "x"})
    wait_for(sidecar_state(spool, "jobs", "ok", "done"), 30, "exit 0")
    later = wait_for(sidecar_state(spool, "jobs", "later", "failed"), 30, "exit 75 retried, then failed")
    bad = wait_for(sidecar_state(spool, "jobs", "bad", "failed"), 30, "exit 3")
    assert later["error"]["retryable"] is True and later["attempts"] == 2
    assert bad["error"]["retryable"] is False and bad["attempts"] == 1
    assert "exit code 3" in bad["error"]["message"] and "oops: 3" in bad["error"]["message"]
    log = process.log()
    assert "value=hello far side item=ok" in log and str(tmp_path) in log


def test_a_timeout_ends_the_far_program(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; exec sleep 300"
    daemon(exec_config(write_config, sshd, {"argv": ["sh", "-c", script], "timeout": "1s"},
                       retry="{attempts: 1, delays: [0s]}"))  # fmt: skip
    drop_request(spool, "slow", {})
    doc = wait_for(sidecar_state(spool, "jobs", "slow", "failed"), 30, "the timeout")
    assert "timed out" in doc["error"]["message"]
    pid = int(pidfile.read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the far program to end")


def test_a_detached_job_runs_once_across_a_cut_link_and_a_killed_daemon(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path, jobs: None
) -> None:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    report = "python3 -c \"import json; print(json.dumps(dict(model='best.pt')))\""
    script = f'echo run >> {runs}; echo "working on $1"; while [ ! -e {gate} ]; do sleep 0.1; done; {report}'
    step = {"argv": ["sh", "-c", script, "sh", "{name}"], "detach": True, "timeout": "5m", "capture_fields": True}
    proxy = Proxy(sshd.port)
    with open(sshd.known_hosts, "a") as known:
        known.write(sshd.known_hosts_line(proxy.port))
    try:
        config = exec_config(write_config, sshd, step, port=proxy.port)
        process = daemon(config)
        drop_request(spool, "train", {})
        wait_for(lambda: runs.exists(), 30, "the job to start")

        def tail_says_working() -> bool:
            doc = read_sidecar(spool, "jobs", "train") or {}
            steps = doc.get("steps") or [{}]
            return "working on train" in (steps[0].get("progress") or {}).get("log_tail", [])

        wait_for(tail_says_working, 30, "the job's log tail in the sidecar")
        assert proxy.cut() >= 1
        process.kill()
        daemon(config)
        wait_for(lambda: proxy.connections >= 2, 30, "the restarted daemon to reconnect")
        assert proxy.cut() >= 1
        gate.touch()
        doc = wait_for(sidecar_state(spool, "jobs", "train", "done"), 60, "the job to finish")
    finally:
        proxy.close()
    assert runs.read_text() == "run\n", "the detached job was started more than once"
    assert doc["fields"]["model"] == "best.pt"


def test_a_detached_job_past_its_timeout_is_stopped_with_its_children(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path, jobs: None
) -> None:
    pidfile = tmp_path / "child"
    script = f"sleep 300 & echo $! > {pidfile}; wait"
    daemon(exec_config(write_config, sshd, {"argv": ["sh", "-c", script], "detach": True, "timeout": "2s"},
                       retry="{attempts: 1, delays: [0s]}"))  # fmt: skip
    drop_request(spool, "long", {})
    doc = wait_for(sidecar_state(spool, "jobs", "long", "failed"), 30, "the timeout")
    assert "timed out" in doc["error"]["message"]
    pid = int(pidfile.read_text())
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in _state(pid), 15, "the job's child to be killed")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][:1]
    except (FileNotFoundError, IndexError):
        return "Z"


def test_a_daemon_stop_leaves_a_detached_job_running_and_a_restart_reattaches(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path, jobs: None
) -> None:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    script = f"echo run >> {runs}; while [ ! -e {gate} ]; do sleep 0.1; done"
    config = exec_config(write_config, sshd, {"argv": ["sh", "-c", script], "detach": True})
    first = daemon(config)
    drop_request(spool, "job", {})
    wait_for(lambda: runs.exists(), 30, "the job to start")
    first.signal(signal.SIGTERM)
    assert first.process is not None and first.process.wait(timeout=20) == 0
    job_id = (read_sidecar(spool, "jobs", "job") or {})["steps"][0]["checkpoint"]["job_id"]
    assert (JOBS / job_id / "pid").exists() and not (JOBS / job_id / "status").exists()
    daemon(config)
    gate.touch()
    wait_for(sidecar_state(spool, "jobs", "job", "done"), 30, "the reattached job to finish")
    assert runs.read_text() == "run\n"
    assert (JOBS / job_id / "status").read_text().strip() == "0"


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"argv": ["true"], "detach": True}, "detach: true needs remote"),
        ({"argv": ["true"], "remote": "ssh://host/some/path"}, "names a path"),
        ({"argv": ["true"], "remote": "ssh://user:secret@host"}, "never put a password"),
        ({"argv": ["true"], "remote": "http://host"}, "must be an ssh:// URL"),
    ],
)
def test_remote_options_are_checked_at_load(step: dict[str, Any], message: str) -> None:
    text = f"queues:\n  q:\n    chain:\n      - exec: {json.dumps(step)}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "test.yaml")
    assert message in str(caught.value.describe())
    assert "secret" not in str(caught.value.describe())


def test_command_lines_are_plain_posix_sh() -> None:
    """The scripts run under dash, the strictest common /bin/sh: a syntax error there would fail every job."""
    job = "0" * 32
    lines = (remote_exec.command_line(["true"], {"A": "b"}, "/"), remote_exec.start_line(job, ["true"], {}, None),
             remote_exec.poll_line(job), remote_exec.signal_line(job, "TERM"))  # fmt: skip
    for line in lines:
        words = subprocess.run(["sh", "-c", f"set -- {line}; for w; do printf '%s\\0' \"$w\"; done"],
                               capture_output=True, check=True).stdout.split(b"\0")  # fmt: skip
        script = words[2].decode()
        assert subprocess.run(["sh", "-n", "-c", script], capture_output=True).returncode == 0, script


def test_remote_exec_rides_the_connection_ship_opened(
    sshd: Sshd, write_config: Callable[..., Path], daemon: Callable[..., Any], spool: Path, tmp_path: Path
) -> None:
    proxy = Proxy(sshd.port)
    with open(sshd.known_hosts, "a") as known:
        known.write(sshd.known_hosts_line(proxy.port))
    connection = {"identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)}
    landed = tmp_path / "landed"
    ship = {"to": f"sftp://{sshd.user}@127.0.0.1:{proxy.port}{landed}/", **connection}
    run = {"remote": f"ssh://{sshd.user}@127.0.0.1:{proxy.port}", "argv": ["test", "-s", f"{landed}/{{name}}"],
           **connection}  # fmt: skip
    try:
        daemon(write_config(f"""
            spool: {{spool}}
            queues:
              files:
                settle: 0.1s
                chain:
                  - ship: {json.dumps(ship)}
                  - exec: {json.dumps(run)}
            """))
        for index in range(3):
            (spool / "files" / "inbox" / f"f{index}.bin").write_bytes(os.urandom(1000))
        for index in range(3):
            wait_for(sidecar_state(spool, "files", f"f{index}.bin", "done"), 30, f"item {index}")
    finally:
        proxy.close()
    assert proxy.connections == 1, "exec opened an SSH connection of its own beside ship's"
