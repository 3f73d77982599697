"""Case "kills": SIGKILL the daemon at random moments, restart it each time, and count what arrived.

Five queues run at once: files to file://, to SFTP (a real sshd, through a counting proxy) and to S3 (moto,
through a counting proxy), PNG frame folders encoded to MP4 and shipped to SFTP, and folders bundled to tar
and shipped to S3. Files are 1-20 MiB so kills land mid-transfer; items are dropped in bursts during the
kill phase so kills land in every phase of the chains. A fifth of the restarts are killed again before the
daemon is ready (a crash during recovery). At the end every destination is read back (the SFTP target on
disk, the bucket by listing and GET) and tallied against what was dropped; encoded videos are compared with
the spool's done copy and their frames counted; tar members are hashed against the dropped files. Open
multipart uploads left in the bucket are a problem.

The figure, resent bytes per kill: the bytes each proxy carried towards the server beyond the payload sizes
delivered through it, divided by the kills. It includes the protocols' own overhead (SSH framing and the
login, HTTP headers, the remote checksum commands), so it is an upper bound on the data sent twice.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torture.daemon import Daemon, poll, states
from torture.tally import (
    Counts,
    Delivered,
    Row,
    is_temp_name,
    scan_folder,
    sha256_bytes,
    sha256_file,
    tally,
    tracebacks_in,
)

MiB = 1 << 20
SEED = int(os.environ.get("SPOOLD_TORTURE_SEED", "20261201"))
ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
       "AWS_SESSION_TOKEN": "testing"}  # fmt: skip
BUCKET = "torture-kills"
FRAMES = 60
MIN_PAUSE = 0.35  # mean seconds between a ready daemon and its kill: less, and kills never land mid-transfer
FILE_QUEUES = ("to_file", "to_sftp", "to_s3")
QUEUES = (*FILE_QUEUES, "episodes", "bundles")


def _drop(inbox: Path, name: str, data: bytes) -> None:
    temp = inbox / f".{name}.tmp"
    temp.write_bytes(data)
    os.rename(temp, inbox / name)


def _drop_folder(staging: Path, inbox: Path) -> None:
    os.rename(staging, inbox / staging.name)
    (inbox / f"{staging.name}.ready").write_text("{}")


def _frames(folder: Path, count: int, start_at: int) -> None:
    folder.mkdir(parents=True)
    source = f"testsrc=size=160x120:rate=30,hue=h={start_at * 37 % 360}"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", source, "-frames:v", str(count),
                    str(folder / "frame_%06d.png")], check=True)  # fmt: skip


def _config(work: Path, spool: Path, dests: dict[str, str], ssh: dict[str, str], s3: dict[str, Any]) -> Path:
    retry = {"attempts": 10, "delays": ["0s", "1s"]}
    checksum = {"checksum": {"algorithms": ["sha256"]}}

    def queue(*chain: dict[str, Any], bundles: bool = False) -> dict[str, Any]:
        return {"settle": "0s", "concurrency": 2, "retry": retry, "chain": list(chain),
                **({"items": "bundles"} if bundles else {})}  # fmt: skip

    queues = {
        "to_file": queue(checksum, {"ship": {"to": dests["file"]}}),
        "to_sftp": queue(checksum, {"ship": {"to": dests["sftp"], **ssh}}),
        "to_s3": queue(checksum, {"ship": {"to": dests["s3"], **s3}}),
        "episodes": queue({"encode": {"fps": 30, "preset": "ultrafast", "crf": 28}},
                          {"ship": {"to": dests["episodes"], **ssh}}, bundles=True),
        "bundles": queue({"bundle": {"format": "tar"}}, {"ship": {"to": dests["bundles"], **s3}}, bundles=True),
    }  # fmt: skip
    path = work / "spoold.yaml"
    path.write_text(json.dumps({"spool": str(spool), "rescan": "1s", "queues": queues}))
    return path


def _end(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


def _temps_inside(found: Delivered) -> Delivered:
    """Files under a temp-named folder (a half-published tree) count as temp files, not as copies."""
    clean = Delivered(temps=list(found.temps))
    for name, digests in found.copies.items():
        if any(is_temp_name(part) for part in Path(name).parts[:-1]):
            clean.temps.append(name)
        else:
            clean.copies[name] = digests
    return clean


def _read_bucket(client: Any, prefix: str) -> tuple[Delivered, dict[str, bytes]]:
    found, bodies = Delivered(), {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"].removeprefix(prefix)
            if any(is_temp_name(part) for part in name.split("/")):
                found.temps.append(name)
                continue
            body = client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
            bodies[name] = body
            found.add(name, sha256_bytes(body))
    return found, bodies


def _tar_members(bodies: dict[str, bytes]) -> Delivered:
    """What the shipped tars hold, by `<folder>/<member>` (a tar that does not open is one corrupt entry)."""
    found = Delivered()
    for name, body in bodies.items():
        try:
            with tarfile.open(fileobj=io.BytesIO(body)) as archive:
                for member in archive.getmembers():
                    if member.isfile() and (stream := archive.extractfile(member)) is not None:
                        found.add(member.name, sha256_bytes(stream.read()))
        except tarfile.TarError:
            found.add(name, "not a tar")
    return found


def _episodes(spool: Path, dest: Path, names: list[str]) -> tuple[Counts, list[str]]:
    """Videos at the SFTP destination against the spool's done copies, and their frame counts."""
    from spoold import media

    expected: dict[str, str] = {}
    problems: list[str] = []
    for name in names:
        for camera in ("cam_a", "cam_b"):
            local = spool / "episodes" / "done" / name / f"{camera}.mp4"
            expected[f"{name}/{camera}.mp4"] = sha256_file(local) if local.exists() else "missing locally"
    found = _temps_inside(scan_folder(dest, recursive=True))
    counts = tally(expected, found)
    for relative in expected:
        if (dest / relative).exists() and (frames := media.probe(dest / relative)["frames"]) != FRAMES:
            problems.append(f"{relative}: {frames} frames of {FRAMES}")
            counts.corrupt += 1
    return counts, problems


def _part_bytes(folder: Path) -> int:
    """The bytes of the `.part` files in `folder` now (one may be renamed away while it is looked at)."""
    total = 0
    for entry in os.scandir(folder) if folder.is_dir() else ():
        if entry.name.endswith(".part"):
            with contextlib.suppress(OSError):
                total += entry.stat().st_size
    return total


def _spool_problems(spool: Path) -> list[str]:
    """Failed sidecars (none is legit here), and anything left in a queue's inbox/ or work/ once all is done."""
    problems = []
    for queue in QUEUES:
        if failed := sorted(n for n, s in states(spool, queue).items() if s == "failed"):
            problems.append(f"{queue}: {len(failed)} failed ({', '.join(failed[:3])})")

    def leftovers() -> list[str]:
        return [f"{q}/{f}/{n}" for q in QUEUES for f in ("inbox", "work") for n in os.listdir(spool / q / f)]

    with contextlib.suppress(TimeoutError):
        poll(lambda: not leftovers(), 10, "inbox/ and work/ emptied", interval=0.2)
    if left := leftovers():
        problems.append(f"left in the spool: {left[:5]}")
    return problems


def _kill_loop(daemon: Daemon, kills: int, budget: float, rng: random.Random, drops: list[Any],
               moved: Callable[[], int]) -> int:  # fmt: skip
    """`kills` SIGKILLs in about `budget` seconds; `drops` (callables) run in order over the first 70 % of them.

    The pause before a kill is drawn around what the budget leaves after the restarts so far (at least
    MIN_PAUSE on average, so a slow machine takes longer rather than killing idle daemons); a fifth of the
    restarts are killed again before the daemon is ready (a crash during recovery). Returns how many kills
    cut a transfer: `moved()` (bytes sent so far) grew in the 50 ms before the kill.
    """
    spread = max(1, int(kills * 0.7))
    started = time.monotonic()
    restarts = 0.0
    mid_transfer = 0
    for index in range(kills):
        share = len(drops) * (index + 1) // spread - len(drops) * index // spread if index < spread else 0
        for _ in range(share):
            if drops:
                drops.pop(0)()
        left = budget - (time.monotonic() - started)
        mean = max(MIN_PAUSE, left / (kills - index) - restarts / max(1, index))
        time.sleep(rng.uniform(0.02, 2 * mean))
        before = moved()
        time.sleep(0.05)
        mid_transfer += moved() > before
        daemon.kill()
        began = time.monotonic()
        if rng.random() < 0.2:
            daemon.start(wait=False)
            time.sleep(rng.uniform(0.02, 0.5))  # die again during recovery
            daemon.kill()
        daemon.start()
        restarts += time.monotonic() - began
    for drop in drops:
        drop()
    return mid_transfer


def run(work: Path, quick: bool) -> list[Row]:  # noqa: PLR0915 - one story, told in order
    import boto3
    from bench.s3 import start_moto
    from tests.netproxy import Proxy
    from tests.sshd import missing_reason, start_sshd

    if reason := missing_reason():
        return [Row("kills", "SIGKILLs", Counts(), figure=f"skipped: {reason}")]
    rng = random.Random(SEED)  # noqa: S311 - a replayable run, not a secret
    kills = 50 if quick else 500
    files_per_queue = 4 if quick else 12
    episodes = 2 if quick else 5
    bundles = 2 if quick else 6
    os.environ.update(ENV)  # for boto3 here; the daemon gets them through its env
    spool, remote, file_dest = work / "spool", work / "sftp-remote", work / "file-dest"
    started = time.monotonic()
    cleanups: list[Any] = []
    try:
        sshd = start_sshd(work / "sshd")
        cleanups.append(sshd.stop)
        moto, moto_url = start_moto(work / "moto.log")
        cleanups.append(lambda: _end(moto))
        ssh_proxy = Proxy(sshd.port)
        cleanups.append(ssh_proxy.close)
        s3_proxy = Proxy(int(moto_url.rsplit(":", 1)[1]))
        cleanups.append(s3_proxy.close)
        known_hosts = work / "known_hosts"
        known_hosts.write_text(sshd.known_hosts_line(ssh_proxy.port))
        client = boto3.client("s3", endpoint_url=moto_url)
        client.create_bucket(Bucket=BUCKET)
        dests = {"file": f"file://{file_dest}/", "sftp": sshd.url(f"{remote}/files/", port=ssh_proxy.port),
                 "s3": f"s3://{BUCKET}/files/", "episodes": sshd.url(f"{remote}/episodes/", port=ssh_proxy.port),
                 "bundles": f"s3://{BUCKET}/bundles/{{name}}.tar"}  # fmt: skip
        ssh = {"identity": str(sshd.identity), "known_hosts": str(known_hosts)}
        s3 = {"endpoint_url": f"http://127.0.0.1:{s3_proxy.port}", "part_size": "5MiB", "concurrency": 2}
        config = _config(work, spool, dests, ssh, s3)

        expected: dict[str, dict[str, str]] = {q: {} for q in (*FILE_QUEUES, "bundles")}
        payload = {"sftp": 0, "s3": 0}
        drops: list[Any] = []
        staging = work / "staging"
        for index in range(files_per_queue * len(FILE_QUEUES)):
            queue = FILE_QUEUES[index % len(FILE_QUEUES)]
            name = f"f{index:03d}.bin"
            data = rng.randbytes(rng.randint(1 * MiB, 20 * MiB))
            (staging / queue).mkdir(parents=True, exist_ok=True)
            (staging / queue / name).write_bytes(data)
            expected[queue][name] = sha256_bytes(data)
            payload[queue[3:]] = payload.get(queue[3:], 0) + len(data)
            drops.append(lambda q=queue, n=name: os.rename(staging / q / n, spool / q / "inbox" / n))
        episode_names = [f"ep{i:02d}" for i in range(episodes)]
        for index, name in enumerate(episode_names):
            for camera in ("cam_a", "cam_b"):
                _frames(staging / "episodes" / name / camera, FRAMES, index * 2 + len(camera))
            drops.append(lambda n=name: _drop_folder(staging / "episodes" / n, spool / "episodes" / "inbox"))
        for index in range(bundles):
            folder = staging / "bundles" / f"b{index:02d}"
            for member in range(rng.randint(5, 40)):
                data = rng.randbytes(rng.randint(100, 300_000))
                (folder / f"d{member % 3}").mkdir(parents=True, exist_ok=True)
                (folder / f"d{member % 3}" / f"m{member:03d}.bin").write_bytes(data)
                expected["bundles"][f"{folder.name}/d{member % 3}/m{member:03d}.bin"] = sha256_bytes(data)
            drops.append(lambda f=folder: _drop_folder(f, spool / "bundles" / "inbox"))
        rng.shuffle(drops)

        daemon = Daemon(config, spool, work / "daemon.log", env=ENV)
        cleanups.insert(0, daemon.stop)
        daemon.start()
        kill_started = time.monotonic()

        def moved() -> int:
            return ssh_proxy.upstream_bytes + s3_proxy.upstream_bytes + _part_bytes(file_dest)

        mid_transfer = _kill_loop(daemon, kills, 40 if quick else 270, rng, drops, moved)
        kill_seconds = time.monotonic() - kill_started
        counts_wanted = {**{q: files_per_queue for q in FILE_QUEUES}, "episodes": episodes, "bundles": bundles}

        def finished() -> bool:
            return all(sum(s in ("done", "failed") for s in states(spool, q).values()) >= n
                       for q, n in counts_wanted.items())  # fmt: skip

        problems: list[str] = []
        try:
            poll(finished, 240 if not quick else 120, "every item done or failed after the kills", interval=0.5)
        except TimeoutError as exc:
            problems.append(str(exc))
        problems += _spool_problems(spool)
        alive = daemon.is_alive
        daemon.stop()

        file_counts = tally(expected["to_file"], scan_folder(file_dest))
        sftp_counts = tally(expected["to_sftp"], scan_folder(remote / "files"))
        episode_counts, episode_problems = _episodes(spool, remote / "episodes", episode_names)
        sftp_counts += episode_counts
        s3_found, _ = _read_bucket(client, "files/")
        s3_counts = tally(expected["to_s3"], s3_found)
        tars, tar_bodies = _read_bucket(client, "bundles/")
        s3_counts += tally(expected["bundles"], _tar_members(tar_bodies))
        s3_counts.temp_published += len(tars.temps)
        s3_problems = [f"{len(u)} multipart uploads left open"
                       for u in [client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])] if u]  # fmt: skip
        extra = sorted(set(s3_found.copies) - set(expected["to_s3"]))
        extra += sorted(set(tars.copies) - {f"b{i:02d}.tar" for i in range(bundles)})
        if extra:
            s3_problems.append(f"unexpected objects: {extra[:5]}")

        sftp_payload = payload["sftp"] + sum(p.stat().st_size for p in (remote / "episodes").rglob("*.mp4"))
        s3_payload = payload["s3"] + sum(len(b) for b in tar_bodies.values())
        resent_sftp = max(0, ssh_proxy.upstream_bytes - sftp_payload)
        resent_s3 = max(0, s3_proxy.upstream_bytes - s3_payload)
        print(
            f"kills: proxies carried {ssh_proxy.upstream_bytes} B to sshd ({ssh_proxy.connections} connections), "
            f"{s3_proxy.upstream_bytes} B to moto ({s3_proxy.connections}); payload {sftp_payload} B, {s3_payload} B"
        )
        faults = f"{kills} SIGKILLs in {kill_seconds:.0f} s ({daemon.starts} starts)"
        first = f"{mid_transfer} of the kills cut a transfer; a killed file:// copy starts over"
        rows = [
            Row("kills", f"{faults}, file://", file_counts, tracebacks=tracebacks_in(daemon.log_path),
                daemon_alive=alive, figure=first,
                problems=problems),
            Row("kills", f"{faults}, sftp:// (files, encode)", sftp_counts, daemon_alive=alive,
                figure=f"{resent_sftp / kills / MiB:.2f} MiB resent per kill ({resent_sftp / MiB:.0f} MiB "
                       f"over {sftp_payload / MiB:.0f} MiB, SSH overhead included)", problems=episode_problems),
            Row("kills", f"{faults}, s3:// (files, bundle)", s3_counts, daemon_alive=alive,
                figure=f"{resent_s3 / kills / MiB:.2f} MiB resent per kill ({resent_s3 / MiB:.0f} MiB "
                       f"over {s3_payload / MiB:.0f} MiB, HTTP overhead included)", problems=s3_problems),
        ]  # fmt: skip
        print(f"kills: {time.monotonic() - started:.0f} s in all", flush=True)
        return rows
    finally:
        for cleanup in cleanups:
            with contextlib.suppress(Exception):  # the others must still be cleaned up
                cleanup()
