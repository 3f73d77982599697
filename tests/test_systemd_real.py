"""The units under a real systemd: README's "Install as a service", word for word, in a booted Debian 12.

A minimal Debian 12 (debootstrap, cached under /var/cache/spoold-test/) is booted with systemd-nspawn;
spoold's wheels are built on the host and installed in it offline. Then: the service runs and ships what
a producer in group spoold drops; STATUS=; reload (good and bad config); a clean stop; the watchdog
restarts a stopped daemon; a bad config fails once with 78; a spool folder it may not fix fails with 73
naming the fix; the template unit; LoadCredential= delivering an S3 key and an SSH key (sftp://, host_key:
tofu recording into the state folder); the security exposure; a stop during a running step; journal fields
per item. Needs root; skipped otherwise, and where the container cannot boot (failing under CI). The first
two tests check the layout code without a container.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.layout import SpoolFolderError, SpoolLayout
from tests.conftest import REPO, need_or_skip
from tests.sshd import keygen
from tests.systemd_container import (
    FAKE_S3,
    SOURCE,
    SPOOL,
    WHEELS,
    Box,
    booted,
    build_wheels,
    install_commands,
    missing_tools,
    poll,
    readme_extras,
)

pytestmark = pytest.mark.timeout(900)


# ---- the layout code alone: what systemd's sandbox refuses (chown, chmod with setgid) ------------------------

def _refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refused)
    monkeypatch.setattr(os, "chmod", refused)


def test_layout_accepts_a_correct_spool_it_may_not_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    SpoolLayout(spool, ["q"]).ensure()
    inbox = spool / "q" / "inbox"
    assert stat.S_IMODE(inbox.stat().st_mode) == 0o2770
    os.chmod(spool / "q" / "done", 0o750)  # setgid lost: a warning, not a failure
    _refuse(monkeypatch)
    SpoolLayout(spool, ["q"]).ensure()
    # New folders take the permission bits from mkdir (under the unit's UMask=0007) and setgid from their parent.
    umask = os.umask(0o007)
    try:
        SpoolLayout(spool, ["q", "r"]).ensure()
    finally:
        os.umask(umask)
    assert stat.S_IMODE((spool / "r" / "inbox").stat().st_mode) == 0o2770
    assert stat.S_IMODE((spool / "r" / "work").stat().st_mode) == 0o2750


def test_layout_names_the_folder_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool = tmp_path / "spool"
    SpoolLayout(spool, ["q"]).ensure()
    inbox = spool / "q" / "inbox"
    os.chmod(inbox, 0o755)
    _refuse(monkeypatch)
    with pytest.raises(SpoolFolderError) as raised:
        SpoolLayout(spool, ["q"]).ensure()
    assert raised.value.filename == str(inbox)
    message = raised.value.strerror or ""
    assert "mode 0755" in message and "2770" in message and f"d {inbox} 2770 " in message, message
    assert "systemd-tmpfiles --create" in message


def test_units_need_nothing_a_minimal_debian_lacks() -> None:
    """Static checks for what issue 15 found; the container tests below show each one under systemd."""
    tmpfiles = (REPO / "systemd" / "spoold.tmpfiles").read_text()
    config_mode = re.search(r"^d /etc/spoold +(\d+) ", tmpfiles, re.M)
    assert config_mode, tmpfiles
    for name in ("spoold.service", "spoold@.service"):
        text = (REPO / "systemd" / name).read_text()
        assert "ExecStartPre=" not in text  # `spoold run` exits 78 itself; a failing ExecStartPre= loops
        reload = re.search(r"^ExecReload=(\S+)", text, re.M)
        assert reload and reload.group(1) == "/bin/sh", "no /bin/kill on minbase (procps)"
        assert re.search(r"^RestartPreventExitStatus=78 73$", text, re.M)
        assert f"ConfigurationDirectoryMode={config_mode.group(1).zfill(4)}\n" in text
        assert re.search(r"^StateDirectory=spoold$", text, re.M)
    plain = (REPO / "systemd" / "spoold.service").read_text().replace("/etc/spoold/spoold.yaml", "/etc/spoold/%i.yaml")
    template = (REPO / "systemd" / "spoold@.service").read_text()
    assert [line for line in plain.splitlines() if not line.startswith(("#", "Description="))] == \
        [line for line in template.splitlines() if not line.startswith(("#", "Description="))]


# ---- the container ---------------------------------------------------------------------------------------------

def _can_run_here() -> None:
    if os.geteuid() != 0:
        pytest.skip("booting a systemd container needs root")
    if missing := missing_tools():
        reason = f"missing {', '.join(missing)} (apt-get install debootstrap systemd-container; make test does)"
        if shutil.which("apt-get") is None:
            pytest.skip(reason)
        need_or_skip(reason)
    if not (REPO / ".venv" / "bin" / "pip").exists():
        need_or_skip("no .venv/bin/pip to build the wheels with")


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    _can_run_here()
    work = tmp_path_factory.mktemp("nspawn")
    timings: dict[str, float] = {}
    started = time.monotonic()
    wheels = work / "wheels"
    try:
        build_wheels(REPO, wheels, readme_extras())
    except subprocess.CalledProcessError as exc:
        need_or_skip(f"cannot build spoold's wheels (is PyPI reachable?): {exc.stderr.decode(errors='replace')}")
    timings["wheels"] = time.monotonic() - started
    with contextlib.ExitStack() as stack:
        try:
            ct, timings["debootstrap"] = stack.enter_context(booted(work))
        except (AssertionError, subprocess.CalledProcessError) as exc:
            need_or_skip(f"cannot boot a Debian container with systemd-nspawn here: {exc}")
            raise
        stack.callback(lambda: print("\ncontainer timings (s):", ", ".join(f"{k} {v:.1f}" for k, v in timings.items())))
        timings["boot"] = time.monotonic() - started - timings["wheels"] - timings["debootstrap"]
        shutil.copytree(wheels, ct.root / WHEELS.lstrip("/"))
        for folder in ("systemd", "etc"):
            shutil.copytree(REPO / folder, ct.root / SOURCE.lstrip("/") / folder)
        mark = time.monotonic()
        script = "\n".join(["set -ex", f"cd {SOURCE}", *install_commands()])
        ct.run(script, timeout=300)
        timings["install"] = time.monotonic() - mark
        ct.run("useradd --create-home --groups spoold producer")
        yield Box(ct, timings)


# ---- 1, 2: README's steps give a running service that ships what producers drop -------------------------------

def test_readme_steps_give_a_running_service(box: Box) -> None:
    assert box.prop("ActiveState") == "active"
    assert box.prop("UnitFileState") == "enabled"
    inbox = f"{SPOOL}/incoming/inbox"
    info = box.path(inbox).stat()
    assert stat.S_IMODE(info.st_mode) == 0o2770, oct(info.st_mode)  # the setgid bit, inherited from the root
    assert stat.S_IMODE(box.path(f"{SPOOL}/incoming/done").stat().st_mode) == 0o2750
    box.drop(inbox, "hello.txt", "hello from a producer\n")
    shipped = box.path(f"{SPOOL}/shipped/hello.txt")
    poll(shipped.exists, 30, "hello.txt shipped to file:///var/spool/spoold/shipped/")
    assert shipped.read_text() == "hello from a producer\n"
    box.wait_state("outgoing", "hello.txt", "done")
    journal = box.journal()
    assert "mode is different" not in journal, journal  # ConfigurationDirectoryMode= agrees with tmpfiles.d
    assert "Operation not permitted" not in journal, journal
    raw = box.ct.run(["cat", f"/proc/{box.prop('MainPID')}/environ"]).stdout
    environ = dict(v.split("=", 1) for v in raw.split("\0") if "=" in v)
    assert environ.get("STATE_DIRECTORY") == "/var/lib/spoold", environ  # where host_key: tofu records keys
    state = box.path("/var/lib/spoold").stat()
    assert stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == info.st_uid  # the daemon's alone
    status = box.ct.run(["systemctl", "status", "spoold", "--no-pager"]).stdout
    assert re.search(r"Status: \"\d+ running, \d+ queued, \d+ failed, disk ok\"", status), status


def test_ready_after_the_first_scan_and_status_text(box: Box) -> None:
    box.ct.run(["systemctl", "stop", "spoold"])
    box.drop(f"{SPOOL}/incoming/inbox", "while-stopped.txt")
    box.ct.run(["systemctl", "start", "spoold"])  # returns on READY=1, sent after the first scan
    assert box.prop("ActiveState") == "active"
    assert re.fullmatch(r"\d+ running, \d+ queued, \d+ failed, disk ok", box.prop("StatusText")), box.prop("StatusText")
    poll(box.path(f"{SPOOL}/shipped/while-stopped.txt").exists, 30, "the file dropped while stopped shipped")


def test_reload_applies_a_good_config_and_keeps_the_old_one_on_a_bad_one(box: Box) -> None:
    original = box.path("/etc/spoold/spoold.yaml").read_text()
    pid = box.prop("MainPID")
    reloaded = box.journal().count("config reloaded")
    box.write_config(original + "  extra:\n    chain:\n      - checksum: {}\n")
    box.ct.run(["systemctl", "reload", "spoold"])
    box.wait_journal("config reloaded", reloaded)
    poll(box.path(f"{SPOOL}/extra/inbox").is_dir, 10, "the new queue's inbox")
    assert box.prop("ActiveState") == "active" and box.prop("MainPID") == pid
    failed = box.journal().count("reload failed")
    box.write_config("spool: [not, a, path\n")
    box.ct.run(["systemctl", "reload", "spoold"])
    box.wait_journal("reload failed, keeping the running config", failed)
    poll(lambda: box.prop("ActiveState") == "active", 10, "active again after the failed reload")
    assert box.prop("MainPID") == pid
    box.drop(f"{SPOOL}/extra/inbox", "still.txt")  # the old (good) config still runs
    box.wait_state("extra", "still.txt", "done")
    box.write_config(original)
    box.ct.run(["systemctl", "reload", "spoold"])
    box.wait_journal("config reloaded", reloaded + 1)


def test_stop_is_clean(box: Box) -> None:
    box.ct.run(["systemctl", "stop", "spoold"])
    props = box.ct.show("spoold", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    box.restart_clean()


# ---- 3, 4: the watchdog restarts a stuck daemon; a bad config fails once ----------------------------------------

def test_watchdog_restarts_a_stopped_daemon(box: Box) -> None:
    box.drop_in("watchdog", "[Service]\nWatchdogSec=3s\nRestartSec=1s\nTimeoutAbortSec=5s\n")
    try:
        box.restart_clean()
        before = box.ct.show("spoold", "MainPID", "NRestarts")
        box.ct.run(["systemctl", "kill", "--kill-who=main", "--signal=SIGSTOP", "spoold"])
        poll(lambda: (now := box.ct.show("spoold", "MainPID", "NRestarts", "ActiveState"))["ActiveState"] == "active"
             and now["MainPID"] not in ("0", before["MainPID"]), 40, "a new main process after the watchdog fired")
        assert int(box.prop("NRestarts")) > int(before["NRestarts"])
        assert "Watchdog timeout" in box.ct.run(["journalctl", "-u", "spoold", "--no-pager"]).stdout
    finally:
        box.drop_in("watchdog", None)
        box.restart_clean()


def assert_fails_once(box: Box, verb: str, status: str) -> None:
    """`systemctl VERB spoold` fails with exit `status`, and systemd does not start it again."""
    restarts = box.prop("NRestarts")
    assert box.ct.run(["systemctl", verb, "spoold"], check=False).returncode != 0
    props = box.ct.show("spoold", "ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "failed", "Result": "exit-code", "ExecMainStatus": status}, props
    deadline = time.monotonic() + 7  # RestartSec=5s: a restart loop would have started again by now
    while time.monotonic() < deadline:
        assert box.ct.show("spoold", "ActiveState", "NRestarts") == {"ActiveState": "failed", "NRestarts": restarts}
        time.sleep(0.5)  # a negative window's poll (no restart may happen): not synchronisation


def test_bad_config_fails_once_with_78(box: Box) -> None:
    original = box.path("/etc/spoold/spoold.yaml").read_text()
    box.write_config("spool: /var/spool/spoold\nqueues:\n  incoming:\n    chain:\n      - no_such_handler: {}\n")
    try:
        assert_fails_once(box, "restart", "78")
        assert "config error" in box.journal()
    finally:
        box.write_config(original)
        box.restart_clean()


def test_a_spool_folder_it_may_not_fix_fails_with_73_naming_the_fix(box: Box) -> None:
    inbox = f"{SPOOL}/incoming/inbox"
    box.ct.run(["systemctl", "stop", "spoold"])
    box.ct.run(["sh", "-c", f"chown root:root {inbox} && chmod 0755 {inbox}"])
    try:
        assert_fails_once(box, "start", "73")
        journal = box.journal()
        assert f"d {inbox} 2770 spoold spoold -" in journal and "systemd-tmpfiles --create" in journal, journal
    finally:
        box.ct.run(["sh", "-c", f"chown spoold:spoold {inbox} && chmod 2770 {inbox}"])
        box.restart_clean()


# ---- 5, 6: the template unit; LoadCredential= ------------------------------------------------------------------

def test_template_instance_runs_its_own_config(box: Box) -> None:
    spool = f"{SPOOL}/edge"
    box.write_config(f"spool: {spool}\nqueues:\n  incoming:\n    chain:\n"
                     f"      - ship: {{to: 'file://{spool}/shipped/'}}\n", "edge")  # fmt: skip
    box.ct.run(["systemctl", "start", "spoold@edge"])
    try:
        assert box.prop("ActiveState", "spoold@edge") == "active"
        box.drop(f"{spool}/incoming/inbox", "edge.txt", "edge\n")
        poll(box.path(f"{spool}/shipped/edge.txt").exists, 30, "edge.txt shipped by spoold@edge")
        box.wait_state("incoming", "edge.txt", "done", spool=spool)
    finally:
        box.ct.run(["systemctl", "stop", "spoold@edge"])


def test_load_credential_reaches_a_step(box: Box) -> None:
    box.ct.write("/root/fakes3.py", FAKE_S3)
    box.ct.write("/etc/spoold/credentials/s3key", "AKIDFROMCREDENTIAL:not-a-real-secret\n", 0o600)
    box.ct.run(["systemd-run", "--unit=fakes3", "--property=Type=simple", "/usr/bin/python3", "/root/fakes3.py"])
    original = box.path("/etc/spoold/spoold.yaml").read_text()
    box.write_config(original + "  keyed:\n    chain:\n      - ship: {to: 's3://bucket/in/', endpoint_url: "
                     "'http://127.0.0.1:9000', region: us-east-1, credential: s3key}\n")  # fmt: skip
    box.drop_in("credential", "[Service]\nLoadCredential=s3key:/etc/spoold/credentials/s3key\n")
    try:
        box.restart_clean()
        box.drop(f"{SPOOL}/keyed/inbox", "keyed.txt", "sent with the credential\n")
        box.wait_state("keyed", "keyed.txt", "done")
        requests = [json.loads(line) for line in box.path("/root/fakes3.log").read_text().splitlines()]
        puts = [r for r in requests if r["method"] == "PUT" and r["path"].startswith("/bucket/in/keyed.txt")]
        assert puts and all("Credential=AKIDFROMCREDENTIAL/" in r["auth"] for r in puts), requests
        assert "not-a-real-secret" not in box.journal()
    finally:
        box.ct.run(["systemctl", "stop", "fakes3"], check=False)
        box.drop_in("credential", None)
        box.write_config(original)
        box.restart_clean()


def test_load_credential_delivers_an_ssh_key(box: Box, tmp_path: Path) -> None:
    box.start_sshd("store", keygen(tmp_path / "edge_key"))  # made on the host; only the public half goes to sshd
    private = (tmp_path / "edge_key").read_text()
    box.ct.write("/etc/spoold/credentials/edge_key", private, 0o600)
    original = box.path("/etc/spoold/spoold.yaml").read_text()
    box.write_config(original + "  overssh:\n    chain:\n      - ship: {to: 'sftp://store@127.0.0.1/home/store/in/', "
                     "credential: edge_key, host_key: tofu}\n")  # fmt: skip
    box.drop_in("ssh-credential", "[Service]\nLoadCredential=edge_key:/etc/spoold/credentials/edge_key\n")
    try:
        box.restart_clean()
        box.drop(f"{SPOOL}/overssh/inbox", "over-ssh.txt", "sent with the SSH credential\n")
        box.wait_state("overssh", "over-ssh.txt", "done")
        assert box.path("/home/store/in/over-ssh.txt").read_text() == "sent with the SSH credential\n"
        host, kind, blob = box.path("/var/lib/spoold/known_hosts").read_text().split()  # ProtectSystem=strict
        assert host == "127.0.0.1" and f"{kind} {blob}" in box.ct.run("cat /etc/ssh/ssh_host_*_key.pub").stdout
        assert box.ct.run(["grep", "-rqF", blob, "/etc", "--exclude-dir=ssh"], check=False).returncode == 1
        assert "recorded in /var/lib/spoold/known_hosts" in box.journal()
        journal = box.ct.run(["journalctl", "--no-pager", "-o", "cat"]).stdout  # every unit's, not only spoold's
        assert "PRIVATE KEY" not in journal and not [s for s in private.splitlines()[1:-1] if s in journal]
    finally:
        box.ct.run(["systemctl", "stop", "ssh.service"], check=False)
        box.drop_in("ssh-credential", None)
        box.write_config(original)
        box.restart_clean()


# ---- 7: the hardening, as systemd itself scores it --------------------------------------------------------------

@pytest.mark.parametrize("unit", ["spoold.service", "spoold@edge.service"])
def test_security_exposure_at_most_1_5(box: Box, unit: str) -> None:
    out = box.ct.run(["systemd-analyze", "security", "--no-pager", unit]).stdout
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert found, out
    assert float(found.group(1)) <= 1.5, out


# ---- 9, 8: a stop during a running step; the journal's fields per item ------------------------------------------

def _offsets(value: Any) -> list[int]:
    """Every `offset` recorded anywhere in a checkpoint (ship keeps one per destination)."""
    if isinstance(value, dict):
        found = [value["offset"]] if isinstance(value.get("offset"), int) else []
        return found + [o for v in value.values() for o in _offsets(v)]
    if isinstance(value, list):
        return [o for v in value for o in _offsets(v)]
    return []


def test_stop_during_a_long_upload_checkpoints_and_the_next_start_resumes(box: Box) -> None:
    original = box.path("/etc/spoold/spoold.yaml").read_text()
    box.write_config(original + "  slow:\n    chain:\n      - ship: {to: 'file:///var/spool/spoold/slow-out/', "
                     "rate: 2MiB/s}\n")  # fmt: skip
    try:
        box.restart_clean()
        box.ct.run(["sh", "-c", f"head -c 16777216 /dev/urandom > /home/producer/big.bin && chown producer "
                    f"/home/producer/big.bin && runuser -u producer -- mv /home/producer/big.bin {SPOOL}/slow/inbox/"])
        box.wait_state("slow", "big.bin", "running")
        out = box.path(f"{SPOOL}/slow-out")
        poll(lambda: out.is_dir() and any(f.stat().st_size >= 1 << 20 for f in out.iterdir()), 20,
             "the capped copy under way (1 MiB written)")  # fmt: skip
        started = time.monotonic()
        box.ct.run(["systemctl", "stop", "spoold"])
        took = time.monotonic() - started
        # Result=success: spoold left by itself, well within TimeoutStopSec=60s (a kill on timeout says "timeout").
        assert box.ct.show("spoold", "ActiveState", "Result") == {"ActiveState": "inactive", "Result": "success"}
        assert took < 20, f"stop took {took:.1f}s"
        doc = box.sidecar("slow", "big.bin") or {}
        offsets = _offsets([e.get("checkpoint", {}) for e in doc.get("steps", [])])
        assert doc.get("state") == "queued" and offsets and 0 < max(offsets) < 16 << 20, doc
        box.ct.run(["systemctl", "start", "spoold"])
        box.wait_state("slow", "big.bin", "done", timeout=30)
        sums = box.ct.run(f"sha256sum {SPOOL}/slow/done/big.bin/big.bin {SPOOL}/slow-out/big.bin").stdout.split()
        assert sums[0] == sums[2], sums
    finally:
        box.write_config(original)
        box.restart_clean()


def test_journal_has_fields_per_item(box: Box) -> None:
    box.drop(f"{SPOOL}/incoming/inbox", "traced.txt")
    box.wait_state("outgoing", "traced.txt", "done")

    def records() -> list[dict[str, Any]]:
        out = box.ct.run(["journalctl", "-u", "spoold", "SPOOLD_ITEM=traced.txt", "-o", "json", "--no-pager"]).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    found = poll(records, 10, "journal records with SPOOLD_ITEM=traced.txt")
    assert {r.get("SPOOLD_QUEUE") for r in found} >= {"incoming", "outgoing"}, found
    assert all(r.get("SPOOLD_ITEM") == "traced.txt" for r in found)
    assert any(r.get("SPOOLD_STEP") for r in found), found
