"""A Debian 12 container booted by systemd-nspawn, for testing the units under a real systemd.

The minimal root filesystem is built once by debootstrap into /var/cache/spoold-test/ (outside the
repository) and reused: it is built in a temporary folder and renamed when complete, under a lock, so an
interrupted build is never reused and two runs never build at once. Each run boots a copy of it, drives
it with `nsenter` into the container's namespaces, and removes the copy afterwards. `Box` is that
container with spoold installed by README's "Install as a service" steps. The tree holds openssh-server with
ssh.service disabled: sshd runs only while the test shipping over SFTP starts it (`Box.start_sshd`).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.conftest import wait_for

CACHE = Path(os.environ.get("SPOOLD_TEST_CACHE", "/var/cache/spoold-test"))
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "openssh-server")
# Bump when PACKAGES change, so an older cached tree is not reused.
ROOTFS = CACHE / f"rootfs-{SUITE}-v2"
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


def missing_tools() -> list[str]:
    return [tool for tool in ("debootstrap", "systemd-nspawn", "nsenter") if shutil.which(tool) is None]


def poll(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """`wait_for`, less often: most predicates here start a process in the container."""
    return wait_for(predicate, timeout, what, interval=interval)


def build_rootfs(log: Path) -> tuple[Path, float]:
    """The cached root filesystem, built first when missing; returns it and the seconds the build took."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (ROOTFS / "etc" / "os-release").exists():
            return ROOTFS, 0.0
        for stale in CACHE.glob("build-*"):
            shutil.rmtree(stale, ignore_errors=True)
        started = time.monotonic()
        building = Path(tempfile.mkdtemp(prefix="build-", dir=CACHE))
        os.chmod(building, 0o755)  # it becomes the container's /: mkdtemp's 0700 would lock out every other user
        try:
            with open(log, "w") as out:
                subprocess.run(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                                str(building), MIRROR], stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, check=True, timeout=900)  # fmt: skip
                # sshd runs only while the test shipping over SFTP starts it (`Box.start_sshd`).
                subprocess.run(["chroot", str(building), "systemctl", "disable", "ssh.service"], stdout=out,
                               stderr=subprocess.STDOUT, env=CLEAN_ENV, check=True, timeout=60)  # fmt: skip
            os.rename(building, ROOTFS)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return ROOTFS, time.monotonic() - started


def build_wheels(repo: Path, dest: Path, extras: str) -> None:
    """spoold's wheel and its dependencies' for `extras`, from a copy of the working tree (no stale build/)."""
    source = dest.parent / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (repo / name).exists():
            shutil.copy2(repo / name, source / name)
    shutil.copytree(repo / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([str(repo / ".venv" / "bin" / "pip"), "wheel", "--quiet", "--wheel-dir", str(dest),
                    f"{source}[{extras}]"], check=True, capture_output=True, timeout=600)  # fmt: skip


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it (nspawn then powers the container off) when pytest dies."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Container:
    """A booted copy of the root filesystem; `run` executes a command inside it as root."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 90) -> None:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                ["systemd-nspawn", "--boot", "--register=no", "--keep-unit", "--private-network",
                 f"--machine=spoold-test-{os.getpid()}", "--console=read-only", "-D", str(self.root)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=CLEAN_ENV,
                preexec_fn=_die_with_parent,  # a killed pytest powers the container off
            )  # fmt: skip
        self.leader = poll(self._find_leader, 30, "the container's init process")
        poll(self._is_up, timeout, "systemctl is-system-running to report running or degraded", 0.25)

    def _find_leader(self) -> int:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.process.returncode}: {self.console_tail()}")
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return 0

    def _is_up(self) -> bool:
        state = self.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        if state in ("running", "degraded"):
            return True
        # "offline" too is what systemctl says before the container's manager listens: wait for it (bounded).
        if state in ("maintenance", "stopping"):
            raise AssertionError(f"the container's systemd is {state}: {self.console_tail()}")
        return False

    def console_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def run(self, argv: Sequence[str] | str, *, check: bool = True, timeout: float = 120, user: str | None = None,
            input_text: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `argv` (a list, or a shell command line) in the container, as root or as `user`."""
        command = ["/bin/sh", "-c", argv] if isinstance(argv, str) else list(argv)
        if user is not None:
            command = ["runuser", "-u", user, "--", *command]
        result = subprocess.run(["nsenter", "-t", str(self.leader), "-a", "--", *command], capture_output=True,
                                text=True, timeout=timeout, env=CLEAN_ENV, input=input_text)  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}")
        return result

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the container (through the host's view of its tree)."""
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        os.chmod(target, mode)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def shut_down(self) -> None:
        """Power the container off (SIGTERM to nspawn); kill it when that takes too long. Never raises."""
        process = self.process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if self.leader:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.leader, signal.SIGKILL)  # the container's PID 1: every process in it goes
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=20)
        self.process = None


@contextlib.contextmanager
def booted(work: Path) -> Iterator[tuple[Container, float]]:
    """A booted private copy of the cached root filesystem; yields it and the rootfs build seconds."""
    rootfs, build_seconds = build_rootfs(work / "debootstrap.log")
    copy = work / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(rootfs), str(copy)], check=True, timeout=300)
    container = Container(copy, work / "console.log")
    try:
        container.boot()
        yield container, build_seconds
    finally:
        container.shut_down()
        shutil.rmtree(copy, ignore_errors=True)


# ---- README's install steps, and the container with spoold installed by them --------------------------------

SPOOL = "/var/spool/spoold"
WHEELS = "/root/wheels"
SOURCE = "/root/spoold-src"
README = Path(__file__).resolve().parent.parent / "README.md"


def readme_install_block() -> list[str]:
    section = README.read_text().split("## Install as a service", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def install_commands() -> list[str]:
    """README's lines up to `enable --now`, without sudo (root runs them), pip pointed at the built wheels."""
    commands = []
    for line in readme_install_block():
        command = line.replace("sudo ", "")
        command, count = re.subn(r"pip install '/path/to/spoold\[([a-z0-9,]+)\]'",
                                 rf"pip install --no-index --find-links {WHEELS} 'spoold[\1]'", command)  # fmt: skip
        assert count or "pip install" not in command, f"README's pip line changed shape: {line}"
        commands.append(command)
        if "systemctl enable --now spoold" in command:
            return commands
    raise AssertionError("README's install block has no `systemctl enable --now spoold`")


def readme_extras() -> str:
    found = re.search(r"pip install '/path/to/spoold\[([a-z0-9,]+)\]'", "\n".join(readme_install_block()))
    assert found, "README installs spoold with pip from a path"
    return found.group(1)


class Box:
    """The booted container with spoold installed by the README's steps."""

    def __init__(self, ct: Container, timings: dict[str, float]) -> None:
        self.ct = ct
        self.timings = timings

    def path(self, inside: str) -> Path:
        return self.ct.root / inside.lstrip("/")

    def prop(self, prop: str, unit: str = "spoold") -> str:
        return self.ct.show(unit, prop).get(prop, "")

    def drop(self, inbox: str, name: str, data: str = "payload\n") -> None:
        """Write a file into `inbox` as the producer, a member of group spoold."""
        self.ct.run(["sh", "-c", 'printf %s "$1" > "$2/$3"', "-", data, inbox, name], user="producer")

    def journal(self, unit: str = "spoold") -> str:
        return self.ct.run(["journalctl", "-u", unit, "--no-pager", "-o", "cat"]).stdout

    def wait_journal(self, text: str, count: int, unit: str = "spoold", timeout: float = 20) -> str:
        """Wait until `text` is in the unit's journal more than `count` times."""
        return str(poll(lambda: (j := self.journal(unit)).count(text) > count and j, timeout, f"journal: {text}"))

    def sidecar(self, queue: str, item: str, spool: str = SPOOL) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads(self.path(f"{spool}/{queue}/status/{item}.json").read_text())
        except (OSError, ValueError):
            return None
        return doc

    def wait_state(self, queue: str, item: str, state: str, timeout: float = 30, spool: str = SPOOL) -> None:
        try:
            poll(lambda: (self.sidecar(queue, item, spool) or {}).get("state") == state, timeout,
                 f"{queue}/{item} {state}")  # fmt: skip
        except AssertionError as exc:
            tail = "\n".join(self.journal().splitlines()[-30:])
            raise AssertionError(f"{exc}\nsidecar: {self.sidecar(queue, item, spool)}\njournal:\n{tail}") from None

    def write_config(self, text: str, name: str = "spoold") -> None:
        self.ct.write(f"/etc/spoold/{name}.yaml", text)

    def drop_in(self, name: str, text: str | None, unit: str = "spoold.service") -> None:
        path = self.path(f"/etc/systemd/system/{unit}.d/{name}.conf")
        if text is None:
            path.unlink(missing_ok=True)
        else:
            self.ct.write(str(path.relative_to(self.ct.root)), text)
        self.ct.run(["systemctl", "daemon-reload"])

    def restart_clean(self) -> None:
        self.ct.run(["systemctl", "reset-failed", "spoold"], check=False)
        self.ct.run(["systemctl", "restart", "spoold"])
        assert self.prop("ActiveState") == "active"

    def start_sshd(self, user: str, public_key: str) -> None:
        """ssh.service (disabled in the image) on the container's own 127.0.0.1:22; `user` logs in with the key."""
        self.ct.write("/etc/ssh/sshd_config.d/spoold-test.conf", "ListenAddress 127.0.0.1\nPasswordAuthentication no\n")
        self.ct.run(f"id {user} >/dev/null 2>&1 || useradd --create-home {user}")
        self.ct.write(f"/home/{user}/.ssh/authorized_keys", public_key + "\n", 0o600)
        self.ct.run(f"chown -R {user}: /home/{user}/.ssh && chmod 700 /home/{user}/.ssh")
        self.ct.run(["systemctl", "start", "ssh.service"])  # Type=notify: returns once sshd listens


FAKE_S3 = r'''
import hashlib, http.server, json, sys
objects = {}
class S3(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass
    def _note(self):
        with open("/root/fakes3.log", "a") as log:
            log.write(json.dumps({"method": self.command, "path": self.path,
                                  "auth": self.headers.get("Authorization", "")}) + "\n")
    def _body(self):
        data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if "aws-chunked" in self.headers.get("Content-Encoding", ""):
            out, rest = b"", data
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                if size == 0:
                    break
                out, rest = out + rest[:size], rest[size + 2:]
            data = out
        return data
    def do_PUT(self):
        self._note()
        body = self._body()
        meta = {k: v for k, v in self.headers.items() if k.lower().startswith("x-amz-meta-")}
        objects[self.path.split("?")[0]] = (body, meta)
        self.send_response(200)
        self.send_header("ETag", '"%s"' % hashlib.md5(body).hexdigest())
        self.send_header("Content-Length", "0")
        self.end_headers()
    def do_HEAD(self):
        self._note()
        found = objects.get(self.path.split("?")[0])
        if found is None:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body, meta = found
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", '"%s"' % hashlib.md5(body).hexdigest())
        for k, v in meta.items():
            self.send_header(k, v)
        self.end_headers()
http.server.ThreadingHTTPServer(("127.0.0.1", 9000), S3).serve_forever()
'''
