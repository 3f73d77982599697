"""The fast SFTP upload path against a real sshd: the cipher negotiated, and the far-side digest tool chosen.

Each test starts sshd (tests/sshd.py) and, where it matters, restarts it with
`SetEnv PATH=... HOME=...` so the far side's commands see only the tools a
test puts in a folder of its own (HOME too, or root's ~/.bashrc adds pyenv).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import xxhash

from spoold.errors import ChecksumMismatch, PermanentError
from spoold.transports import sftp_digest, sftp_upload
from spoold.transports.base import TransferContext, parse_url
from spoold.transports.sftp import SftpTransport, temp_name
from tests.conftest import need_or_skip, sidecar_state, wait_for
from tests.sshd import SSHD, Sshd, free_port, missing_reason, start_sshd

MiB = 1 << 20
# A stand-in for xxhsum's `xxh128sum`, with this interpreter's xxhash: its output format, stdin as `stdin`.
XXH128SUM = f"""#!{sys.executable}
import sys, xxhash
names = [a for a in sys.argv[1:] if a != "--"] or [None]
for name in names:
    h = xxhash.xxh3_128()
    with (open(name, "rb") if name else sys.stdin.buffer) as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    print(h.hexdigest() + "  " + (name or "stdin"))
"""
LYING_OPENSSL = f"""#!/bin/sh
for a in "$@"; do [ "$a" = -- ] || [ "${{a#-}}" != "$a" ] || echo "SHA2-256($a)= {"0" * 64}"; done
"""
LYING_XXH128SUM = """#!/bin/sh
for a in "$@"; do [ "$a" = -- ] || echo "0123456789abcdef0123456789abcdef  $a"; done
"""


@pytest.fixture
def far(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Starts sshd on demand: `far["start"](tools=None | {name: real path or script text}, extra=config lines)`."""
    reason = missing_reason()
    if reason:
        need_or_skip(reason)
    servers: list[Sshd] = []

    def start(tools: dict[str, str] | None = None, extra: str = "") -> Sshd:
        server = start_sshd(tmp_path / f"sshd{len(servers)}")
        servers.append(server)
        if tools is None and not extra:
            return server
        server.stop()
        lines = extra
        if tools is not None:
            folder = tmp_path / f"bin{len(servers)}"
            (folder / "home").mkdir(parents=True)
            for name, what in {"head": shutil.which("head") or "/usr/bin/head", **tools}.items():
                if what.startswith("#!"):
                    (folder / name).write_text(what)
                    (folder / name).chmod(0o755)
                else:
                    (folder / name).symlink_to(what)
            lines += f"SetEnv PATH={folder} HOME={folder / 'home'}\n"
        # On a port of its own: the stopped sshd's may not be free again at once.
        config, port = server.root / "sshd_config", free_port()
        config.write_text(config.read_text().replace(f"Port {server.port}\n", f"Port {port}\n") + lines)
        server.port = port
        server.known_hosts.write_text(server.known_hosts_line())
        with open(server.root / "sshd.log", "ab") as log:
            server.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
                return server
            except OSError:
                assert server.process.poll() is None, (server.root / "sshd.log").read_text()
                assert time.monotonic() < deadline, "sshd did not come back"
                time.sleep(0.05)  # a poll's interval, bounded by the deadline above: not synchronisation

    yield {"start": start}
    for server in servers:
        server.stop()


def transport(server: Sshd, target: Path) -> SftpTransport:
    settings = {"identity": str(server.identity), "known_hosts": str(server.known_hosts), "connect_timeout": 10}
    return SftpTransport(parse_url(server.url(str(target))), settings)


def context(checkpoint: dict[str, Any] | None = None) -> TransferContext:
    return TransferContext(lambda _d, _t: None, {} if checkpoint is None else checkpoint, lambda: None, lambda: None)


def ship(server: Sshd, source: Path, target: Path, sha256: str | None = None,
         known: dict[str, str] | None = None) -> SftpTransport:  # fmt: skip
    """put_file `source` to `target`; the (closed) transport, to look at what it learnt of the far side."""
    ours = transport(server, target)
    try:
        delivered = ours.put_file(source, str(target), {**({"sha256": sha256} if sha256 else {}), **(known or {})},
                                  context())  # fmt: skip
        assert delivered.is_verified
    finally:
        ours.close()
    assert target.read_bytes() == source.read_bytes()
    return ours


def logged_tools(tmp_path: Path, tools: list[str]) -> tuple[Path, dict[str, str]]:
    """Far-side `tools` (xxh128sum is the stand-in above) that each append their name to the returned file
    when run, as scripts for `far["start"]`; skips the test when one is not installed here."""
    calls = tmp_path / "far-calls"
    (tmp_path / "xxh-real").write_text(XXH128SUM)
    (tmp_path / "xxh-real").chmod(0o755)
    real = {"openssl": shutil.which("openssl") or "/usr/bin/openssl", "xxh128sum": str(tmp_path / "xxh-real"),
            "python3": "/usr/bin/python3"}  # not a pyenv shim, which needs the HOME it is not given
    if not all(Path(real[t]).exists() for t in tools):
        pytest.skip(f"{tools} not installed here")
    return calls, {t: f'#!/bin/sh\necho {t} >> {calls}\nexec {real[t]} "$@"\n' for t in tools}


def payload(path: Path, size: int = 3 * MiB) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def test_aes128_gcm_is_negotiated_when_the_server_offers_it(far: dict[str, Any], tmp_path: Path) -> None:
    server = far["start"]()
    ours = transport(server, tmp_path / "x")
    try:
        ssh = ours._connection()
        assert ssh.local_cipher == ssh.remote_cipher == "aes128-gcm@openssh.com"
    finally:
        ours.close()


def test_a_server_without_gcm_still_gets_a_fast_cipher(far: dict[str, Any], tmp_path: Path) -> None:
    server = far["start"](extra="Ciphers aes256-ctr,chacha20-poly1305@openssh.com\n")
    ours = transport(server, tmp_path / "x")
    try:
        ssh = ours._connection()
        assert ssh.local_cipher == ssh.remote_cipher == "aes256-ctr"
    finally:
        ours.close()


def test_the_fastest_sha256_tool_of_the_host_is_used(far: dict[str, Any], tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed here")
    server = far["start"]()
    source = payload(tmp_path / "data.bin")
    ours = ship(server, source, tmp_path / "out.bin")
    tools = ours._far_digests().tools
    assert tools is not None
    # A host with xxhsum's xxh128sum (or b3sum) has a faster tool still; among the sha256 ones openssl leads.
    assert next(t for t in tools if sftp_digest.TOOLS[t][0] == "sha256") == "openssl"
    assert ours._far_digests().algorithm == ("sha256" if tools[0] == "openssl" else "xxh3_128")


@pytest.mark.parametrize("tools", [{"sha256sum": "/usr/bin/sha256sum"}, {"python3": "/usr/bin/python3"}])
def test_a_path_without_openssl_falls_back(tools: dict[str, str], far: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if not all(Path(p).exists() for p in tools.values()):
        pytest.skip(f"{tools} not installed here")
    server = far["start"](tools)
    reads: list[str] = []
    real = sftp_digest.read_back_sha256
    monkeypatch.setattr(sftp_digest, "read_back_sha256", lambda c, p, n: reads.append(p) or real(c, p, n))
    source = payload(tmp_path / "data.bin")
    ours = ship(server, source, tmp_path / "out.bin")
    assert ours._far_digests().tools == list(tools)
    assert reads == [], "hashed on the far side, not read back"


def test_no_tool_at_all_reads_back(far: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = far["start"]({})
    reads: list[str] = []
    real = sftp_digest.read_back_sha256
    monkeypatch.setattr(sftp_digest, "read_back_sha256", lambda c, p, n: reads.append(p) or real(c, p, n))
    ours = ship(server, payload(tmp_path / "data.bin"), tmp_path / "out.bin")
    assert ours._far_digests().tools == []
    assert reads == [temp_name(str(tmp_path / "out.bin"))]


def test_xxh128sum_is_preferred_and_computed_while_sending(far: dict[str, Any], tmp_path: Path) -> None:
    server = far["start"]({"xxh128sum": XXH128SUM, "openssl": shutil.which("openssl") or "/usr/bin/openssl"})
    source = payload(tmp_path / "data.bin")
    ours = ship(server, source, tmp_path / "out.bin")
    assert ours._far_digests().algorithm == "xxh3_128"
    assert ours._far_digests().tools == ["xxh128sum", "openssl"]
    ship(server, source, tmp_path / "out.bin", hashlib.sha256(source.read_bytes()).hexdigest())
    with pytest.raises(PermanentError, match="changed since its checksum was taken"):
        ship(server, source, tmp_path / "other.bin", "ab" * 32)  # the given sha256 is still checked, here


def test_a_known_xxh3_128_is_compared_with_the_far_sides_and_nothing_is_hashed_here(
        far: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """`checksum: {algorithms: [sha256, xxh3_128]}` and a far `xxh128sum`: the checksum step's xxh3_128 is what
    the far side's digest must be, so the sending board hashes nothing while it sends."""
    hashed_here: list[set[str]] = []
    real_hasher = sftp_upload.SendHasher

    def recording(algorithms: set[str]) -> sftp_upload.SendHasher:
        hashed_here.append(set(algorithms))
        return real_hasher(algorithms)

    monkeypatch.setattr(sftp_upload, "SendHasher", recording)
    server = far["start"]({"xxh128sum": XXH128SUM, "openssl": shutil.which("openssl") or "/usr/bin/openssl"})
    source = payload(tmp_path / "data.bin")
    data = source.read_bytes()
    known = {"sha256": hashlib.sha256(data).hexdigest(), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    ship(server, source, tmp_path / "out.bin", known=known)
    assert hashed_here and all(not algorithms for algorithms in hashed_here)
    hashed_here.clear()
    ship(server, source, tmp_path / "only-sha.bin", known={"sha256": known["sha256"]})
    assert hashed_here[-1] == set(), "the far side's sha256 (openssl) is compared with the known one"
    ship(server, source, tmp_path / "none.bin")
    assert hashed_here[-1] == {"xxh3_128"}, "nothing known: the far side's fastest digest, made here while sending"
    only_xxh = far["start"]({"xxh128sum": XXH128SUM})
    ship(only_xxh, source, tmp_path / "no-far-sha.bin", known={"sha256": known["sha256"]})
    assert hashed_here[-1] == {"xxh3_128", "sha256"}, "the far tool's digest, and the known one to prove the source"
    with pytest.raises(PermanentError, match="changed since its checksum was taken"):
        ship(only_xxh, source, tmp_path / "no-far-sha-wrong.bin", known={"sha256": "ab" * 32})
    # A known xxh3_128 the copy does not match: the far side's digest was compared with it, not with one made here.
    with pytest.raises(PermanentError, match="changed since its checksum was taken"):
        ship(server, source, tmp_path / "wrong.bin", known={**known, "xxh3_128": "0" * 32})
    assert not (tmp_path / "wrong.bin").exists() and not (tmp_path / temp_name("wrong.bin")).exists()


@pytest.mark.parametrize(("tools", "size"), [(["openssl"], 3 * MiB), (["xxh128sum"], 3 * MiB),
                                             (["openssl", "python3"], 40 * MiB)])  # python3 hashes as it lands
def test_the_far_digest_started_during_the_upload_is_the_one_used(tools: list[str], size: int,
                                                                   far: dict[str, Any], tmp_path: Path) -> None:
    """One far-side hash per upload: the answer of the one started while sending is read as its tool prints it
    (openssl's `SHA2-256(path)= digest` was not, and the file was hashed a second time)."""
    calls, logged = logged_tools(tmp_path, tools)
    server = far["start"](logged)
    source = payload(tmp_path / "data.bin", size)
    ours = ship(server, source, tmp_path / "out.bin")
    assert ours._far_digests().tools == tools
    assert calls.read_text().split() == [tools[-1] if size >= sftp_digest.FOLLOW_BYTES else tools[0]]


@pytest.mark.parametrize("liar", ["openssl", "xxh128sum"])
def test_a_lying_digest_tool_still_fails_verification(liar: str, far: dict[str, Any], tmp_path: Path) -> None:
    server = far["start"]({liar: LYING_OPENSSL if liar == "openssl" else LYING_XXH128SUM})
    source = payload(tmp_path / "data.bin")
    target = tmp_path / "out.bin"
    ours = transport(server, target)
    try:
        with pytest.raises(ChecksumMismatch):
            ours.put_file(source, str(target), {}, context())
        with pytest.raises(ChecksumMismatch):  # and with the checksum step's sha256, hashed nowhere here
            ours.put_file(source, str(target), {"sha256": hashlib.sha256(source.read_bytes()).hexdigest()}, context())
    finally:
        ours.close()
    assert not target.exists()
    assert not Path(temp_name(str(target))).exists(), "the bad copy is removed"


def test_a_given_sha256_is_checked_on_the_far_side_only(far: dict[str, Any], tmp_path: Path) -> None:
    server = far["start"]()
    source = payload(tmp_path / "data.bin")
    good = hashlib.sha256(source.read_bytes()).hexdigest()
    ship(server, source, tmp_path / "out.bin", good)
    ours = transport(server, tmp_path / "other.bin")
    try:
        with pytest.raises(PermanentError, match="changed since its checksum was taken"):
            ours.put_file(source, str(tmp_path / "other.bin"), {"sha256": "ab" * 32}, context())
    finally:
        ours.close()
    assert not (tmp_path / "other.bin").exists()


@pytest.mark.parametrize("tools", [None, {"sha256sum": "/usr/bin/sha256sum"}, {"xxh128sum": XXH128SUM}])
def test_hostile_names_are_hashed_on_the_far_side(tools: dict[str, str] | None, far: dict[str, Any], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    server = far["start"](tools)
    reads: list[str] = []
    real = sftp_digest.read_back_sha256
    monkeypatch.setattr(sftp_digest, "read_back_sha256", lambda c, p, n: reads.append(p) or real(c, p, n))
    dest = tmp_path / "far"
    dest.mkdir()
    for name in ["sp ace 'q\" $(touch spoold-canary)`touch spoold-canary`", "-n", "new\nline", "back\\slash",
                 "(par)= x"]:  # fmt: skip
        ship(server, payload(tmp_path / "src.bin", 100_000), dest / name)
    assert not (Path.home() / "spoold-canary").exists()
    assert not list(tmp_path.rglob("spoold-canary"))
    assert reads == [], "hashed on the far side, whatever the name"


def test_resume_checks_the_prefix_with_the_far_tool(far: dict[str, Any], tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    server = far["start"]({"xxh128sum": XXH128SUM})
    source = payload(tmp_path / "data.bin", 5 * MiB)
    target = tmp_path / "out.bin"
    Path(temp_name(str(target))).write_bytes(source.read_bytes()[: 2 * MiB])
    with caplog.at_level(logging.INFO, logger="spoold.sftp"):
        ship(server, source, target)
    assert f"resuming upload at {2 * MiB} of {5 * MiB} bytes" in caplog.text
    bad = bytearray(source.read_bytes()[: 2 * MiB])
    bad[10] ^= 1
    Path(temp_name(str(target))).write_bytes(bad)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spoold.sftp"):
        ship(server, source, target)
    assert "does not match the local file" in caplog.text


def test_a_large_file_is_hashed_on_the_far_side_while_it_lands(far: dict[str, Any], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    server = far["start"]({"python3": "/usr/bin/python3", "sha256sum": "/usr/bin/sha256sum"})
    after: list[list[str]] = []
    real = sftp_digest.FarDigests.of_files
    monkeypatch.setattr(sftp_digest.FarDigests, "of_files", lambda s, c, p, a: after.append(p) or real(s, c, p, a))
    source = payload(tmp_path / "data.bin", sftp_digest.FOLLOW_BYTES + MiB)
    ship(server, source, tmp_path / "out.bin")
    ship(server, source, tmp_path / "out.bin", hashlib.sha256(source.read_bytes()).hexdigest())
    assert after == [], "no second pass over the file after the upload"
    # A stale longer partial is truncated by the upload, never mistaken for it.
    Path(temp_name(str(tmp_path / "out.bin"))).write_bytes(os.urandom(sftp_digest.FOLLOW_BYTES + 2 * MiB))
    ship(server, source, tmp_path / "out.bin")


def test_a_queue_whose_checksum_has_xxh3_128_is_verified_by_the_far_xxh128sum(
        far: dict[str, Any], tmp_path: Path, spool: Path, daemon: Any, write_config: Any) -> None:  # fmt: skip
    """End to end: `checksum: {algorithms: [sha256, xxh3_128]}` then `ship: sftp://`, a file and a bundle; the far
    side hashes each file once, with its fastest tool, and everything lands whole."""
    calls, logged = logged_tools(tmp_path, ["xxh128sum", "openssl"])
    server = far["start"](logged)
    dest = tmp_path / "far"
    options = {"to": server.url(f"{dest}/"), "identity": str(server.identity), "known_hosts": str(server.known_hosts)}
    chain = f"\n    chain:\n      - checksum: {{algorithms: [sha256, xxh3_128]}}\n      - ship: {json.dumps(options)}"
    daemon(write_config(f"spool: {{spool}}\nqueues:\n  files:\n    settle: 0s{chain}\n"
                        f"  bundles:\n    items: bundles{chain}\n"))  # fmt: skip
    payload = os.urandom(2 * MiB + 5)
    (spool / "files" / "inbox" / ".clip.tmp").write_bytes(payload)
    os.rename(spool / "files" / "inbox" / ".clip.tmp", spool / "files" / "inbox" / "clip.bin")
    doc = wait_for(sidecar_state(spool, "files", "clip.bin", "done"), 60, "the file shipped")
    assert (dest / "clip.bin").read_bytes() == payload
    assert doc["steps"][0]["result"]["xxh3_128"] == xxhash.xxh3_128(payload).hexdigest()
    assert doc["steps"][1]["result"]["verified"] is True
    assert calls.read_text().split() == ["xxh128sum"], "one far hash, by the fastest tool"
    bundle = spool / "bundles" / "inbox" / "episode_1"
    (bundle / "cam").mkdir(parents=True)
    frames = {f"cam/{n:04d}.png": os.urandom(1000 + n) for n in range(3)}
    for relative, data in frames.items():
        (bundle / relative).write_bytes(data)
    (spool / "bundles" / "inbox" / "episode_1.ready").write_text("{}")
    wait_for(sidecar_state(spool, "bundles", "episode_1", "done"), 60, "the bundle shipped")
    assert {r: (dest / "episode_1" / r).read_bytes() for r in frames} == frames
    assert set(calls.read_text().split()) == {"xxh128sum"}
