"""Loop-mounted ext4 images and tmpfs mounts for the power and disk cases; every mount is undone on exit."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def run(*argv: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check)


def why_not() -> str | None:
    """None when this machine can do loop devices and ext4 as root, else the reason."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("losetup", "mkfs.ext4", "mount", "umount", "fsfreeze"):
        if shutil.which(tool) is None:
            return f"no {tool}"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control"
    return None


def make_image(image: Path, mib: int) -> None:
    with open(image, "wb") as stream:
        stream.truncate(mib << 20)
    # No lazy init: its background writes would race the copies and slow the first minutes.
    run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(image))


def unmount(mountpoint: Path) -> None:
    """Unmount, retrying while something is still busy, lazily at last (bounded)."""
    for _ in range(50):
        if run("umount", str(mountpoint), check=False).returncode == 0 or not os.path.ismount(mountpoint):
            return
        time.sleep(0.1)
    run("umount", "-l", str(mountpoint), check=False)


def detach(device: str) -> None:
    for _ in range(20):
        if run("losetup", "-d", device, check=False).returncode == 0:
            return
        time.sleep(0.1)


@contextlib.contextmanager
def loop_mount(image: Path, mountpoint: Path, options: str = "noatime") -> Iterator[str]:
    """Attach `image` to a new loop device and mount it (ext4 replays its journal here); yields the device."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    device = run("losetup", "-f", "--show", str(image)).stdout.strip()
    try:
        run("mount", "-t", "ext4", "-o", options, device, str(mountpoint))
        try:
            yield device
        finally:
            unmount(mountpoint)
    finally:
        detach(device)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    mountpoint.mkdir(parents=True, exist_ok=True)
    run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


@contextlib.contextmanager
def frozen(mountpoint: Path) -> Iterator[None]:
    """`fsfreeze` a filesystem: writes into it block until the thaw, which always happens."""
    run("fsfreeze", "-f", str(mountpoint), timeout=120)
    try:
        yield
    finally:
        run("fsfreeze", "-u", str(mountpoint), check=False)
