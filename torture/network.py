"""Network faults on a veth link to a namespace: an 8 Mbit link, a blackhole, resets, sshd and moto restarts.

The case makes a network namespace with a veth pair (10.209.x.1 here, .2 there) and runs a real OpenSSH
sshd and moto's S3 server in it; the daemon runs in the root namespace and ships over SFTP and S3 through
the link, shaped with `tc tbf` to 8 Mbit. The blackhole takes the far end of the link down behind a
permanent neighbour entry, so packets leave and vanish (no reset, no ICMP), as on a pulled cable.
The namespace, the veth, the qdisc and the servers are removed in `finally`.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torture.daemon import Daemon, poll, sidecars, states
from torture.tally import Counts, Delivered, Row, is_temp_name, scan_folder, sha256_bytes, tally, tracebacks_in

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
LINK_BYTES_S = 8_000_000 / 8  # 8 Mbit
SFTP_IO_FLOOR = 30.0  # the SFTP transport never waits less than this on a read (src/spoold/transports/sftp.py)
S3_READ_TIMEOUT = 120.0  # botocore read_timeout the S3 transport sets (src/spoold/transports/s3.py)
CONNECT_TIMEOUT = 5.0
RETRY_DELAYS = (1.0, 2.0, 4.0)
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET = "torture-network"


def sh(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60, env={**os.environ, **ENV})
    if check and done.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Link:
    """A namespace joined to this one by a veth pair; `near` is this side's address, `far` the namespace's."""

    def __init__(self) -> None:
        tag = os.getpid() % 10000
        self.ns, self.near_dev, self.far_dev = f"spoold-t{tag}", f"vst{tag}a", f"vst{tag}b"
        subnet = 4 * (os.getpid() % 60)
        self.near, self.far = f"10.209.{tag % 250}.{subnet + 1}", f"10.209.{tag % 250}.{subnet + 2}"
        self.prefix = ["ip", "netns", "exec", self.ns]

    def up(self) -> None:
        sh("ip", "netns", "add", self.ns)
        sh("ip", "link", "add", self.near_dev, "type", "veth", "peer", "name", self.far_dev, "netns", self.ns)
        sh("ip", "addr", "add", f"{self.near}/30", "dev", self.near_dev)
        sh("ip", "link", "set", self.near_dev, "up")
        sh(*self.prefix, "ip", "addr", "add", f"{self.far}/30", "dev", self.far_dev)
        sh(*self.prefix, "ip", "link", "set", self.far_dev, "up")
        sh(*self.prefix, "ip", "link", "set", "lo", "up")
        sh("tc", "qdisc", "replace", "dev", self.near_dev, "root", "tbf", "rate", "8mbit", "burst", "32kbit",
           "latency", "400ms")  # fmt: skip

    def blackhole(self) -> None:
        mac = sh(*self.prefix, "cat", f"/sys/class/net/{self.far_dev}/address").strip()
        sh("ip", "neigh", "replace", self.far, "lladdr", mac, "dev", self.near_dev, "nud", "permanent")
        sh(*self.prefix, "ip", "link", "set", self.far_dev, "down")

    def restore(self) -> None:
        sh(*self.prefix, "ip", "link", "set", self.far_dev, "up")

    def down(self) -> None:
        sh("tc", "qdisc", "del", "dev", self.near_dev, "root", check=False)
        sh("ip", "link", "del", self.near_dev, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


def descendants_of(pid: int, children: dict[int, list[int]]) -> list[int]:
    return [c for child in children.get(pid, []) for c in (child, *descendants_of(child, children))]


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    return descendants_of(pid, children)


class Server:
    """A server process in the namespace (its own session), restartable on the same port."""

    def __init__(self, argv: list[str], host: str, port: int, log: Path) -> None:
        self.argv, self.host, self.port, self.log = argv, host, port, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *, wait: bool = True) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

        def listening() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv[4]} exited: {self.log.read_text(errors='replace')[-500:]}")
            with socket.socket() as probe:
                probe.settimeout(1)
                return probe.connect_ex((self.host, self.port)) == 0

        if wait:
            poll(listening, 30, f"{self.argv[4]} on {self.host}:{self.port}", interval=0.1)

    def restart(self) -> None:
        self.kill()
        time.sleep(1)
        self.start()

    def kill(self) -> None:
        """SIGKILL the server and every process it forked (sshd's sessions too): a crash, not a reload."""
        if self.process is None or self.process.poll() is not None:
            return
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)


def sshd_server(root: Path, link: Link, port: int) -> tuple[Server, dict[str, str]]:
    from tests.sshd import SSHD, keygen

    root.mkdir(parents=True)
    host_public = keygen(root / "host_ed25519")
    (root / "authorized_keys").write_text(keygen(root / "id_ed25519") + "\n")
    (root / "known_hosts").write_text(f"[{link.far}]:{port} {host_public}\n[127.0.0.1]:{port + 1} {host_public}\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress {link.far}\nHostKey {root / 'host_ed25519'}\nPidFile none\nUsePAM no\n"
        "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nAuthorizedKeysFile {root / 'authorized_keys'}\n"
        "Subsystem sftp internal-sftp\nLogLevel ERROR\nMaxStartups 50\nMaxSessions 50\n"
    )
    server = Server([*link.prefix, SSHD, "-D", "-e", "-f", str(root / "sshd_config")], link.far, port,
                    root / "sshd.log")  # fmt: skip
    return server, {"identity": str(root / "id_ed25519"), "known_hosts": str(root / "known_hosts")}


def seconds_for(size: int) -> float:
    return size / LINK_BYTES_S


def s3_client(endpoint: str) -> Any:
    import boto3
    import botocore.config

    config = botocore.config.Config(connect_timeout=5, read_timeout=30, retries={"max_attempts": 2})
    return boto3.client("s3", endpoint_url=endpoint, region_name=ENV["AWS_DEFAULT_REGION"], config=config,
                        aws_access_key_id=ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=ENV["AWS_SECRET_ACCESS_KEY"])  # fmt: skip


def scan_bucket(client: Any) -> Delivered:
    found = Delivered()
    for item in client.list_objects_v2(Bucket=BUCKET).get("Contents", []):
        if is_temp_name(item["Key"]):
            found.temps.append(item["Key"])
        else:
            found.add(item["Key"], sha256_bytes(client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()))
    return found


class Run:
    """The daemon, its spool and what each queue was given."""

    def __init__(self, work: Path, daemon: Daemon) -> None:
        self.work, self.daemon = work, daemon
        self.spool = work / "spool"
        self.problems: list[str] = []
        self.seen_tracebacks = 0

    def drop(self, queue: str, name: str, size: int) -> str:
        data = os.urandom(size)
        inbox = self.spool / queue / "inbox"
        (inbox / f".{name}.tmp").write_bytes(data)
        os.rename(inbox / f".{name}.tmp", inbox / name)
        return sha256_bytes(data)

    def wait(self, queue: str, names: list[str], timeout: float) -> dict[str, float]:
        return {name: at for (_, name), at in self.wait_all([(queue, n) for n in names], timeout).items()}

    def wait_all(self, items: list[tuple[str, str]], timeout: float) -> dict[tuple[str, str], float]:
        """When (monotonic) each (queue, item) was first seen done; items failed or not done are problems."""
        done: dict[tuple[str, str], float] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(items) and time.monotonic() < deadline and self.daemon.is_alive:
            now = {queue: states(self.spool, queue) for queue in {q for q, _ in items}}
            for queue, name in items:
                if (queue, name) not in done and now[queue].get(name) == "done":
                    done[queue, name] = time.monotonic()
                elif now[queue].get(name) == "failed":
                    self.problems.append(f"{queue}/{name} failed")
                    return done
            time.sleep(0.1)
        if missing := [f"{q}/{n}" for q, n in items if (q, n) not in done]:
            self.problems.append(f"{', '.join(missing)} not done within {timeout:.0f} s")
        return done

    def attempts(self, queue: str, name: str) -> int:
        """The ship step's attempt number in the item's sidecar (1: no attempt failed)."""
        for doc in sidecars(self.spool, queue):
            if doc.get("item") == name:
                return int(next((s.get("attempt", 0) for s in doc.get("steps", []) if s.get("name") == "ship"), 0))
        return 0

    def row(self, faults: str, counts: Counts, figure: str) -> Row:
        total = tracebacks_in(self.daemon.log_path)
        row = Row("network", faults, counts, total - self.seen_tracebacks, self.daemon.is_alive, figure,
                  self.problems)  # fmt: skip
        self.seen_tracebacks, self.problems = total, []
        return row


def config(work: Path, link: Link, ports: dict[str, int], keys: dict[str, str]) -> Path:
    retry = {"attempts": 40, "delays": [f"{d:g}s" for d in RETRY_DELAYS]}

    def queue(ship: dict[str, Any]) -> dict[str, Any]:
        return {"settle": "0.2s", "retry": retry, "chain": [{"checksum": {"algorithms": ["sha256"]}}, {"ship": ship}]}

    sftp = {**keys, "connect_timeout": f"{CONNECT_TIMEOUT:g}s"}
    user = getpass.getuser()
    queues = {
        "sftp": queue({"to": f"sftp://{user}@{link.far}:{ports['sshd']}{work / 'far' / 'sftp'}/", **sftp}),
        "cut": queue({"to": f"sftp://{user}@127.0.0.1:{ports['sshd'] + 1}{work / 'far' / 'cut'}/", **sftp}),
        "s3": queue({"to": f"s3://{BUCKET}/", "endpoint_url": f"http://{link.far}:{ports['moto']}",
                     "part_size": "5MiB", "concurrency": 2, "connect_timeout": f"{CONNECT_TIMEOUT:g}s"}),
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps({"spool": str(work / "spool"), "queues": queues}))
    return path


def run(work: Path, quick: bool) -> list[Row]:
    if os.geteuid() != 0 or subprocess.run(["ip", "netns", "list"], check=False, capture_output=True).returncode:
        return [Row("network", "skipped: needs root and `ip netns`", Counts())]
    from tests.netproxy import Proxy

    link, servers, proxy, daemon = Link(), [], None, None
    try:
        link.up()
        ports = {"sshd": 20000 + os.getpid() % 20000, "moto": 41000 + os.getpid() % 20000}
        sshd, keys = sshd_server(work / "sshd", link, ports["sshd"])
        everywhere = "0.0.0.0"  # noqa: S104 - the case's own namespace: its lo and its end of the veth
        moto = Server([*link.prefix, sys.executable, "-m", "tests.moto_launcher", "-H", everywhere, "-p",
                       str(ports["moto"])], link.far, ports["moto"], work / "moto.log")  # fmt: skip
        servers = [sshd, moto]
        for server in servers:
            server.start()
        client = s3_client(f"http://{link.far}:{ports['moto']}")
        client.create_bucket(Bucket=BUCKET)
        proxy = Proxy(ports["sshd"], port=ports["sshd"] + 1, target_host=link.far)
        daemon = Daemon(config(work, link, ports, keys), work / "spool", work / "daemon.log", env=ENV).start()
        r = Run(work, daemon)
        sftp_far, cut_far = work / "far" / "sftp", work / "far" / "cut"
        expected_sftp, expected_s3 = dict[str, str](), dict[str, str]()  # name -> sha256, per destination
        return [shaped(r, quick, expected_sftp, expected_s3, sftp_far, client),
                blackhole(r, quick, link, expected_sftp, expected_s3, sftp_far, client),
                resets(r, quick, proxy, cut_far),
                restart(r, "sftp", "sshd", 8 * MiB, SFTP_IO_FLOOR, lambda: scan_folder(sftp_far),
                        sshd.restart),
                restart(r, "s3", "moto", 12 * MiB, S3_READ_TIMEOUT, lambda: scan_bucket(client),
                        lambda: restart_moto(link, moto))]  # fmt: skip
    finally:
        if daemon is not None:
            daemon.stop()
        if proxy is not None:
            proxy.close()
        for server in servers:
            server.kill()
        link.down()


def shaped(r: Run, quick: bool, exp_sftp: dict[str, str], exp_s3: dict[str, str], sftp_far: Path,
           client: Any) -> Row:  # fmt: skip
    """(a) Ships over the 8 Mbit link: all arrive, at a believable rate."""
    rates, sane = [], True
    for queue, expected, count, size in (("sftp", exp_sftp, 2 if quick else 4, 2 * MiB),
                                         ("s3", exp_s3, 1 if quick else 2, 6 * MiB)):  # fmt: skip
        started = time.monotonic()
        names = [f"shaped-{i}.bin" for i in range(count)]
        expected.update({name: r.drop(queue, name, size) for name in names})
        done = r.wait(queue, names, 30 + 3 * seconds_for(count * size))
        seconds = max(done.values(), default=time.monotonic()) - started
        rate = count * size / seconds
        rates.append(f"{queue} {rate / MiB:.2f} MiB/s")
        sane = sane and 0.3 * LINK_BYTES_S <= rate <= 1.1 * LINK_BYTES_S
    if not sane:
        r.problems.append("a rate outside 30-110 % of the link")
    counts = tally(exp_sftp, scan_folder(sftp_far))
    counts += tally(exp_s3, scan_bucket(client))
    return r.row("8 Mbit link (tbf)", counts, f"{', '.join(rates)} on a {LINK_BYTES_S / MiB:.2f} MiB/s link")


def blackhole(r: Run, quick: bool, link: Link, exp_sftp: dict[str, str], exp_s3: dict[str, str], sftp_far: Path,
              client: Any) -> Row:  # fmt: skip
    """(b) The link goes silent mid-transfer for longer than the timeouts; both ships finish once it is back."""
    seconds, size = (45.0 if quick else 75.0), 8 * MiB
    exp_sftp["hole.bin"] = r.drop("sftp", "hole.bin", size)
    exp_s3["hole.bin"] = r.drop("s3", "hole.bin", size)
    time.sleep(3)
    if any(states(r.spool, q).get("hole.bin") == "done" for q in ("sftp", "s3")):
        r.problems.append("an item finished before the blackhole")
    link.blackhole()
    time.sleep(seconds)
    link.restore()
    back = time.monotonic()
    slack = max(RETRY_DELAYS) + CONNECT_TIMEOUT + 2 * seconds_for(2 * size) + 10
    figures, bounds = [], {"sftp": SFTP_IO_FLOOR + slack, "s3": S3_READ_TIMEOUT + slack}
    done = r.wait_all([("sftp", "hole.bin"), ("s3", "hole.bin")], max(bounds.values()))
    for (queue, _), at in sorted(done.items()):
        figures.append(f"{queue} done {at - back:.1f} s after (bound {bounds[queue]:.0f} s, "
                       f"attempt {r.attempts(queue, 'hole.bin')})")
        if at - back > bounds[queue]:
            r.problems.append(f"{queue} took longer than its bound")
    if seconds > SFTP_IO_FLOOR + 10 and r.attempts("sftp", "hole.bin") == 1:
        r.problems.append(f"BUG: the SFTP attempt sat through {seconds:.0f} s of silence: no {SFTP_IO_FLOOR:.0f} s "
                          "stall timeout on uploads")
    counts = tally(exp_sftp, scan_folder(sftp_far))
    counts += tally(exp_s3, scan_bucket(client))
    return r.row(f"blackhole {seconds:.0f} s mid-transfer", counts, "link back; " + ", ".join(figures))


def resets(r: Run, quick: bool, proxy: Any, far: Path) -> Row:
    """(c) Every connection through the loopback proxy cut, several times during one SFTP transfer."""
    cuts, size = (3 if quick else 5), 12 * MiB
    expected = {"reset.bin": r.drop("cut", "reset.bin", size)}
    cut = 0
    for number in range(1, cuts + 1):
        def opened(n: int = number) -> bool:
            return bool(proxy.connections >= n)

        poll(opened, 60, f"connection {number} through the proxy")
        time.sleep(2)
        cut += proxy.cut()
    last = time.monotonic()
    done = r.wait("cut", ["reset.bin"], SFTP_IO_FLOOR + 20 + 2 * seconds_for(size))
    figure = f"{cut} connections cut in {cuts} resets, {proxy.connections} opened"
    if "reset.bin" in done:
        figure += f"; done {done['reset.bin'] - last:.1f} s after the last, attempt {r.attempts('cut', 'reset.bin')}"
    if cut < cuts:
        r.problems.append("a reset found no connection open (the transfer was not under way)")
    return r.row(f"{cuts} connection resets", tally(expected, scan_folder(far)), figure)


CREATE_BUCKET = """import sys, time, boto3
client, error = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1"), None
for _ in range(100):
    try:
        sys.exit(client.create_bucket(Bucket=sys.argv[2]) and 0)
    except Exception as exc:
        error = exc
        time.sleep(0.2)
sys.exit(f"moto did not come back: {error}")"""


def restart_moto(link: Link, moto: Server) -> None:
    """moto comes back empty: the link is held down until the bucket is made again from inside the namespace,
    so the daemon never meets a server without its bucket (NoSuchBucket is rightly permanent)."""
    link.blackhole()
    try:
        moto.kill()
        time.sleep(1)
        moto.start(wait=False)
        sh(*link.prefix, sys.executable, "-c", CREATE_BUCKET, f"http://127.0.0.1:{moto.port}", BUCKET)
    finally:
        link.restore()


def restart(r: Run, queue: str, what: str, size: int, timeout: float, scan: Callable[[], Delivered],
            bring_back: Callable[[], object]) -> Row:  # fmt: skip
    """(d, e) The server killed mid-transfer (with every session it forked) and started again."""
    name = f"{what}-restart.bin"
    expected = {name: r.drop(queue, name, size)}
    time.sleep(4)
    if states(r.spool, queue).get(name) == "done":
        r.problems.append(f"{name} finished before the restart")
    bring_back()
    back = time.monotonic()
    bound = timeout + max(RETRY_DELAYS) + CONNECT_TIMEOUT + 2 * seconds_for(size) + 10
    done = r.wait(queue, [name], bound)
    figure = f"{what} killed and restarted at 4 s" + (f"; done {done[name] - back:.1f} s after it was back "
                                                      f"(bound {bound:.0f} s, attempt {r.attempts(queue, name)})"
                                                      if name in done else "")  # fmt: skip
    if what == "moto":  # the new server never saw the old parts: intact means the whole file, sent afresh
        afresh = "starting afresh" in r.daemon.log_path.read_text(errors="replace")
        figure += "; upload started afresh" if afresh else "; (the upload had no saved id to forget)"
    return r.row(f"{what} restart mid-transfer", tally(expected, scan()), figure)
