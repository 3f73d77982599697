"""Field note 003 end to end on moto's S3 server and a real sshd: datasets routed by size (small ones to the store
over SFTP, large ones by multipart to S3), twenty publishes from four client nodes at once into one room
manifest (none lost), and four workers pulling the large dataset with their caches (the second pull on a node is
a cache hit, counted in the server's request log). The configs are etc/003-datasets-s3.yaml and
etc/003-worker.yaml, rendered. moto runs through tests/moto_launcher.py, which makes its conditional PUTs atomic
as real S3's are (moto alone checks and writes in two steps, so racing writers could both win there)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import boto3

from tests.conftest import DaemonProcess, read_sidecar, wait_for
from tests.sshd import Sshd, keygen
from tests.test_workflows import render_example, secrets_leaked, start_daemon

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
CLIENTS, PER_CLIENT, WORKERS = 4, 5, 4


def ended(spool: Path, queue: str, item: str) -> dict[str, Any] | None:
    doc = read_sidecar(spool, queue, item)
    if doc and doc["state"] == "failed":
        raise AssertionError(f"{queue}/{item} failed: {doc['error']}")
    return doc if doc and doc["state"] == "done" else None


def gets_of(log: Path, key: str) -> int:
    """GET requests for `key` in moto's request log (HEADs and listings are not counted)."""
    return sum(1 for line in log.read_text(errors="replace").splitlines() if f'"GET /{key}' in line)


def test_003_route_by_size_publish_without_lost_updates_and_pull_with_a_cache(
    sshd: Sshd, tmp_path: Path, moto_s3: str, moto_s3_log: Path
) -> None:
    s3 = boto3.client("s3", endpoint_url=moto_s3, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")  # fmt: skip
    for bucket in ("sleap-rtc-uploads", "sleap-rtc-rooms"):
        s3.create_bucket(Bucket=bucket)
    room = f"room-{uuid.uuid4().hex[:8]}"
    store = tmp_path / "store"
    key = tmp_path / "store_key"
    with open(sshd.root / "authorized_keys", "a") as authorized:
        authorized.write(keygen(key) + "\n")
    endpoint = f"endpoint_url: '{moto_s3}'"
    daemons: list[DaemonProcess] = []
    try:
        clients = []
        for node in range(CLIENTS):
            spool = tmp_path / f"client{node}"
            config = tmp_path / f"client{node}.yaml"
            config.write_text(render_example("003-datasets-s3.yaml", [
                ("spool: /var/spool/spoold", f"spool: {spool}"),
                ("sftp://sleap@store.lan'", f"sftp://{sshd.user}@127.0.0.1:{sshd.port}'"),
                ("/etc/spoold/store_key", str(key)),
                ("/etc/spoold/known_hosts", str(sshd.known_hosts)),
                ("sftp://store/datasets/", f"sftp://store{store}/"),
                ("size_below: 100MiB", "size_below: 1MiB"),
                ("size_at_least: 100MiB", "size_at_least: 1MiB"),
                ("part_size: 100MiB, concurrency: 10}", f"part_size: 5MiB, concurrency: 4, {endpoint}}}"),
                ("sha256: '{sha256}'}}}", f"sha256: '{{sha256}}'}}}}, {endpoint}}}"),
            ]))  # fmt: skip
            daemons.append(start_daemon(config, spool, tmp_path / f"client{node}.log", ENV))
            clients.append(spool)
        # One large dataset (multipart to S3), nineteen small ones (SFTP), dropped on all four nodes at once.
        names: dict[str, Path] = {}
        large = f"{room}__big"
        for node, spool in enumerate(clients):
            for index in range(PER_CLIENT):
                name = large if node == index == 0 else f"{room}__n{node}d{index}"
                folder = tmp_path / "make" / name
                (folder / "labels").mkdir(parents=True)
                size = 11 << 20 if name == large else 2000
                (folder / "frames.bin").write_bytes(os.urandom(size))
                (folder / "labels" / "a.slp").write_text(f"labels of {name}\n")
                os.rename(folder, spool / "datasets" / "inbox" / name)
                (spool / "datasets" / "inbox" / f"{name}.ready").write_text("{}")
                names[name] = spool
        docs = {name: wait_for(lambda n=name, s=spool: ended(s, "datasets", n), 120, f"dataset {name}")  # type: ignore[misc]
                for name, spool in names.items()}  # fmt: skip

        # Four workers, each pulling the large dataset twice: once from S3, then from its cache.
        workers = []
        for node in range(WORKERS):
            spool = tmp_path / f"worker{node}"
            config = tmp_path / f"worker{node}.yaml"
            cache = tmp_path / f"cache{node}"
            config.write_text(render_example("003-worker.yaml", [
                ("spool: /var/spool/spoold", f"spool: {spool}"),
                ("cache: {path: /var/cache/spoold, max: 200GiB}", f"cache: {{path: {cache}, max: 1GiB}}"),
                ("cache: true}", f"cache: true, {endpoint}}}"),
                ("/usr/local/bin/train", "/bin/true"),
            ]))  # fmt: skip
            daemons.append(start_daemon(config, spool, tmp_path / f"worker{node}.log", ENV))
            workers.append(spool)
        object_key = f"sleap-rtc-uploads/{large}.tar"

        def drop_job(spool: Path, job: str) -> None:
            inbox = spool / "jobs" / "inbox"
            (inbox / f".{job}.tmp").write_text(json.dumps({"dataset": f"s3://{object_key}"}))
            os.rename(inbox / f".{job}.tmp", inbox / f"{job}.json")

        for spool in workers:
            drop_job(spool, "job1")
        for spool in workers:
            wait_for(lambda s=spool: ended(s, "jobs", "job1"), 120, f"{spool.name}'s first pull")  # type: ignore[misc]
        downloads = gets_of(moto_s3_log, object_key)
        for spool in workers:
            drop_job(spool, "job2")
        for spool in workers:
            wait_for(lambda s=spool: ended(s, "jobs", "job2"), 60, f"{spool.name}'s second pull")  # type: ignore[misc]
        cached_gets = gets_of(moto_s3_log, object_key) - downloads
    finally:
        for process in daemons:
            process.stop()

    # Routing: each dataset went one way, and the sidecar says which step was skipped.
    for name, doc in docs.items():
        ships = [step for step in doc["steps"] if step["name"] == "ship"]
        assert [("skipped" in step) for step in ships] == ([True, False] if name == large else [False, True])
        assert (store / f"{name}.tar").exists() != (name == large)
    listed = s3.list_objects_v2(Bucket="sleap-rtc-uploads", Prefix=room)
    assert [o["Key"] for o in listed.get("Contents", [])] == [f"{large}.tar"]
    # No lost update: all twenty entries in the room manifest, whatever the conflicts.
    manifest = json.loads(s3.get_object(Bucket="sleap-rtc-rooms", Key=f"{room}/manifest.json")["Body"].read())
    assert sorted(manifest["datasets"]) == sorted(names)
    conflicts = sum(step["result"]["conflicts"] for doc in docs.values() for step in doc["steps"]
                    if step["name"] == "publish")  # fmt: skip
    print(f"publish: {len(names)} updates from {CLIENTS} nodes, {conflicts} conflicts (412) retried")
    for name, doc in docs.items():
        recorded = manifest["datasets"][name]
        assert recorded["key"] == f"{name}.tar" and len(recorded["sha256"]) == 64
        assert recorded["sha256"] in json.dumps(doc["digests"]), "the manifest names the archive's own digest"
    # The cache: every worker downloaded the object once; the second pulls asked S3 for nothing.
    assert downloads >= WORKERS and cached_gets == 0
    body = s3.get_object(Bucket="sleap-rtc-uploads", Key=f"{large}.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as archive:
        assert sorted(archive.getnames())[-1].endswith("labels/a.slp")
    digest = hashlib.sha256(body).hexdigest()
    for spool in workers:
        pulled = [p for p in (spool / "datasets").rglob(f"{large}.tar") if p.is_file()]
        assert pulled and all(hashlib.sha256(p.read_bytes()).hexdigest() == digest for p in pulled)
    assert not secrets_leaked([key], [tmp_path])
