"""publish: read-modify-write of a shared JSON document with optimistic locking, never losing an update.

Against the real things: `file://` documents on the real filesystem with writers in several processes
and threads; `s3://` documents on moto's S3 server (the session fixture `moto_s3`), which runs through
tests/moto_launcher.py: moto checks `If-Match` / `If-None-Match` and then writes in two steps, so the
launcher serialises its PUTs as real S3 makes conditional writes atomic; without that, two racing
writers could both win on moto and a lost update would be moto's, not spoold's. Real daemons run the
handler end to end; the transports are driven directly where a test is about the protocol itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from spoold.daemon.config import parse_config
from spoold.errors import ConfigError, PermanentError, TemplateError, VersionConflict
from spoold.handlers.publish import Change, PublishOptions, parse_document, publish, render_change
from spoold.transports.base import parse_url
from spoold.transports.local import LocalTransport
from tests.conftest import REPO, DaemonProcess, read_sidecar, sidecar_state, wait_for

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def drop(spool: Path, name: str, data: bytes, queue: str = "datasets") -> None:
    inbox = spool / queue / "inbox"
    temp = inbox / f".{name}.tmp"
    temp.write_bytes(data)
    temp.rename(inbox / name)


def publish_step(to: str, options: str) -> str:
    return f"""\
        spool: {{spool}}
        queues:
          datasets:
            settle: 0s
            retry: {{attempts: 1, delays: [0s]}}
            fields: {{pattern: '^(?P<room>[a-z]+)_(?P<ds>.+)\\.bin$'}}
            chain:
              - checksum: {{algorithms: [sha256]}}
              - publish: {{to: '{to}', {options}}}
        """


def local() -> LocalTransport:
    return LocalTransport(parse_url("file:///"), {})


# -- through a real daemon ------------------------------------------------------------------------------------------


def test_creates_the_document_then_sets_and_removes_dotted_paths(
    write_config: WriteConfig, spool: Path, daemon: Start, tmp_path: Path
) -> None:
    to = f"file://{tmp_path}/rooms/{{room}}/manifest.json"
    sets = "set: {'datasets.{ds}': {key: '{name}', sha256: '{sha256}', tags: ['{room}', 1]}, 'room.id': '{room}'}"
    daemon(write_config(publish_step(to, sets + ", remove: ['datasets.old', 'no.such.path']")))
    drop(spool, "lab_first.bin", b"one")
    done = wait_for(sidecar_state(spool, "datasets", "lab_first.bin", "done"), 20, "first publish")
    manifest = tmp_path / "rooms" / "lab" / "manifest.json"
    first = json.loads(manifest.read_text())
    sha = done["steps"][0]["result"]["sha256"]
    assert first == {"datasets": {"first": {"key": "lab_first.bin", "sha256": sha, "tags": ["lab", 1]}},
                     "room": {"id": "lab"}}  # fmt: skip
    result = done["steps"][1]["result"]
    assert result["changed"] is True and result["conflicts"] == 0
    assert result["version"].startswith("sha256:") and result["to"].endswith("/rooms/lab/manifest.json")

    # Someone else's keys stay; `datasets.old` goes; a dot inside a field value stays inside one key.
    manifest.write_text(json.dumps({**first, "datasets": {**first["datasets"], "old": 1}, "owner": "ops"}))
    drop(spool, "lab_v1.2.bin", b"two")
    wait_for(sidecar_state(spool, "datasets", "lab_v1.2.bin", "done"), 20, "second publish")
    second = json.loads(manifest.read_text())
    assert second["owner"] == "ops"
    assert set(second["datasets"]) == {"first", "v1.2"}, "a field holding a dot made extra levels"
    assert second["datasets"]["v1.2"]["key"] == "lab_v1.2.bin"


def test_a_document_that_is_not_an_object_fails_permanently_and_is_left_alone(
    write_config: WriteConfig, spool: Path, daemon: Start, tmp_path: Path
) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text("[1, 2, 3]\n")
    garbled = tmp_path / "garbled.json"
    garbled.write_text('{"datasets": ')
    config = write_config(publish_step(f"file://{tmp_path}/{{room}}.json", "set: {'datasets.{ds}': '{sha256}'}")
                          .replace("(?P<room>[a-z]+)", "(?P<room>manifest|garbled)"))  # fmt: skip
    daemon(config)
    drop(spool, "manifest_a.bin", b"a")
    drop(spool, "garbled_a.bin", b"b")
    for item, words in (("manifest_a.bin", "holds an array, not a JSON object"), ("garbled_a.bin", "not valid JSON")):
        doc = wait_for(sidecar_state(spool, "datasets", item, "failed"), 20, f"{item} failed")
        assert doc["error"]["type"] == "permanent" and doc["error"]["retryable"] is False
        assert words in doc["error"]["message"], doc["error"]
        assert doc["attempts"] <= 1, "a permanent error was retried"
    assert manifest.read_text() == "[1, 2, 3]\n"
    assert garbled.read_text() == '{"datasets": '


def test_setting_through_a_value_that_is_not_an_object_names_the_path(tmp_path: Path) -> None:
    target = tmp_path / "doc.json"
    target.write_text('{"datasets": {"x": 5}}')
    change = Change(removes=[], sets=[(("datasets", "x", "sha256"), "abc")])
    with pytest.raises(PermanentError, match=r"cannot set 'datasets\.x\.sha256': 'datasets\.x' holds a number"):
        publish(local(), str(target), change, retries=3, sleep=lambda _s: None, shown="doc")
    assert target.read_text() == '{"datasets": {"x": 5}}'


def test_reapplying_the_same_change_writes_nothing(tmp_path: Path) -> None:
    """What makes a re-run after `kill -9` safe: the change is already there, so the document is not rewritten."""
    target = str(tmp_path / "doc.json")
    change = Change(removes=[("old",)], sets=[(("datasets", "a"), {"n": 1})])
    first = publish(local(), target, change, retries=0, sleep=lambda _s: None, shown="doc")
    written = (tmp_path / "doc.json").stat().st_mtime_ns
    again = publish(local(), target, change, retries=0, sleep=lambda _s: None, shown="doc")
    assert first.is_changed and not again.is_changed and again.version == first.version
    assert (tmp_path / "doc.json").stat().st_mtime_ns == written
    nothing = publish(local(), str(tmp_path / "absent.json"), Change(removes=[("x",)], sets=[]), retries=0,
                      sleep=lambda _s: None, shown="absent")  # fmt: skip
    assert not nothing.is_changed and not (tmp_path / "absent.json").exists(), "a remove created the document"


# -- options and templates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "words"), [
    ("to: 'sftp://host/m.json', set: {a: 1}", "must be an s3:// or file:// URL"),
    ("to: 's3://b/rooms/', set: {a: 1}", "name the document itself"),
    ("to: 's3://b/m.json'", "nothing to publish"),
    ("to: 's3://b/m.json', set: {'a..b': 1}", "empty level"),
    ("to: 's3://b/m.json', remove: ['a.{x.y}']", "plain name"),
    ("to: 's3://b/m.json', set: {a: 2024-01-01}", "cannot go in JSON"),
    ("to: 's3://b/m.json', set: {a: 1}, retries: -1", "retries must be between"),
    ("to: 's3://b/m.json', set: {a: 1}, identity: /k", "unknown key 'identity'"),
])  # fmt: skip
def test_bad_options_are_config_errors_naming_the_step(options: str, words: str) -> None:
    text = textwrap.dedent(f"""\
        spool: /tmp/unused
        queues:
          q:
            chain:
              - publish: {{{options}}}
        """)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "spoold.yaml")
    assert words in str(caught.value)
    assert "spoold.yaml:5: queues.q.chain[0].publish" in str(caught.value)


def test_templates_render_per_level_and_a_lone_field_keeps_its_type() -> None:
    options = PublishOptions(to="s3://b/m.json", set_={
        "datasets.{name}": {"count": "{count}", "label": "n={count}", "{name}": ["{flag}"]},
        "by_host.{host}.{{literal}}": "{name}",
    }, remove=["stale.{name}"])  # fmt: skip
    change = render_change(options, {"name": "a.b", "count": 3, "flag": True, "host": "edge"})
    assert change.removes == [("stale", "a.b")]
    assert change.sets == [
        (("datasets", "a.b"), {"count": 3, "label": "n=3", "a.b": [True]}),
        (("by_host", "edge", "{literal}"), "a.b"),
    ]
    with pytest.raises(TemplateError, match="empty level"):
        render_change(PublishOptions(to="s3://b/m.json", set_={"x.{name}": 1}), {"name": ""})
    with pytest.raises(TemplateError, match="needs field 'room'"):
        render_change(PublishOptions(to="s3://b/m.json", set_={"x": "{room}"}), {"name": "n"})


def test_parse_document_bounds_what_it_accepts() -> None:
    assert parse_document(b'{"a": 1}', "d") == {"a": 1}
    for data, words in ((b"", "not valid JSON"), (b'"text"', "holds a string"), (b"[" * 100_000, "not valid JSON"),
                        (b"\xff\xfe{", "not valid JSON")):  # fmt: skip
        with pytest.raises(PermanentError, match=words):
            parse_document(data, "d")


# -- file:// ---------------------------------------------------------------------------------------------------------


WRITER = """
import sys, threading
sys.path.insert(0, {repo!r})
from spoold.handlers.publish import Change, publish
from spoold.transports.base import parse_url
from spoold.transports.local import LocalTransport

transport = LocalTransport(parse_url("file:///"), {{}})
conflicts = []

def write(thread):
    total = 0
    for n in range({count}):
        change = Change(removes=[], sets=[(("entries", f"{{sys.argv[1]}}-{{thread}}-{{n}}"), {{"n": n}})])
        total += publish(transport, {target!r}, change, retries=1000, sleep=lambda _s: None, shown="doc").conflicts
    conflicts.append(total)

threads = [threading.Thread(target=write, args=(t,)) for t in range({threads})]
for t in threads: t.start()
for t in threads: t.join()
print(sum(conflicts))
"""


def test_file_writers_in_several_processes_and_threads_lose_no_update(tmp_path: Path) -> None:
    target = tmp_path / "shared" / "registry.json"
    processes, threads, count = 4, 3, 15
    script = WRITER.format(repo=str(REPO / "src"), target=str(target), count=count, threads=threads)
    writers = [subprocess.Popen([sys.executable, "-c", script, f"p{i}"], stdout=subprocess.PIPE, text=True)
               for i in range(processes)]  # fmt: skip
    conflicts = 0
    for writer in writers:
        out, _ = writer.communicate(timeout=60)
        assert writer.returncode == 0
        conflicts += int(out.strip())
    entries = json.loads(target.read_text())["entries"]
    expected = {f"p{p}-{t}-{n}" for p in range(processes) for t in range(threads) for n in range(count)}
    assert set(entries) == expected, f"lost {len(expected - set(entries))} updates"
    print(f"file:// {len(expected)} updates from {processes * threads} writers: {conflicts} conflicts")
    assert not list(target.parent.glob(".*.tmp")), "a temp file was left behind"


def test_file_version_conflicts_and_links_are_refused(tmp_path: Path) -> None:
    transport = local()
    target = str(tmp_path / "doc.json")
    assert transport.read_document(target, 1024) == (None, None)
    first = transport.write_document(target, b'{"a": 1}\n', None)
    with pytest.raises(VersionConflict, match="was created"):
        transport.write_document(target, b'{"b": 1}\n', None)
    second = transport.write_document(target, b'{"a": 2}\n', first)
    with pytest.raises(VersionConflict, match="changed"):
        transport.write_document(target, b'{"a": 3}\n', first)
    assert transport.read_document(target, 1024) == (b'{"a": 2}\n', second)
    with pytest.raises(PermanentError, match="more than the limit"):
        transport.read_document(target, 4)

    secret = tmp_path / "secret.json"
    secret.write_text('{"keep": true}')
    link = tmp_path / "link.json"
    link.symlink_to(secret)
    with pytest.raises(PermanentError, match="symlink"):
        transport.read_document(str(link), 1024)
    with pytest.raises(PermanentError, match="symlink"):
        transport.write_document(str(link), b"{}", None)
    lock_link = tmp_path / "other.json"
    (tmp_path / ".other.json.spoold.lock").symlink_to(secret)
    with pytest.raises(PermanentError, match=r"lock file .* is a symlink"):
        transport.write_document(str(lock_link), b"{}", None)
    assert secret.read_text() == '{"keep": true}' and link.is_symlink()


# -- s3:// on moto ---------------------------------------------------------------------------------------------------


@pytest.fixture
def bucket(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> str:
    import boto3

    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    name = f"spoold-publish-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_s3).create_bucket(Bucket=name)
    return name


def test_s3_stale_etag_is_a_412_and_a_version_conflict(moto_s3: str, bucket: str) -> None:
    import boto3
    import botocore.exceptions

    from spoold.transports.s3 import S3Transport

    transport = S3Transport(parse_url(f"s3://{bucket}/"), {"endpoint_url": moto_s3})
    try:
        assert transport.read_document("/rooms/m.json", 1024) == (None, None)
        first = transport.write_document("/rooms/m.json", b'{"a": 1}\n', None)
        with pytest.raises(VersionConflict):  # If-None-Match: * on an existing object
            transport.write_document("/rooms/m.json", b'{"b": 1}\n', None)
        second = transport.write_document("/rooms/m.json", b'{"a": 2}\n', first)
        with pytest.raises(VersionConflict, match="PreconditionFailed"):
            transport.write_document("/rooms/m.json", b'{"a": 3}\n', first)
        assert transport.read_document("/rooms/m.json", 1024) == (b'{"a": 2}\n', second)
        with pytest.raises(PermanentError, match="more than the 4 bytes"):
            transport.read_document("/rooms/m.json", 4)
        with pytest.raises(PermanentError, match="NoSuchBucket"):
            S3Transport(parse_url("s3://no-such-bucket/"), {"endpoint_url": moto_s3}).read_document("/m.json", 10)
    finally:
        transport.close()
    # What the mapping relies on: botocore reports the refused condition as code PreconditionFailed, status 412.
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        boto3.client("s3", endpoint_url=moto_s3).put_object(Bucket=bucket, Key="rooms/m.json", Body=b"{}",
                                                            IfMatch=first)  # fmt: skip
    assert caught.value.response["Error"]["Code"] == "PreconditionFailed"
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_four_daemons_publishing_at_once_lose_no_update(
    moto_s3: str, bucket: str, tmp_path: Path, daemon: Start
) -> None:
    import boto3

    nodes, items = 4, 5
    spools = [tmp_path / f"node{n}" / "spool" for n in range(nodes)]
    started = []
    for n, node_spool in enumerate(spools):
        config = tmp_path / f"node{n}.yaml"
        config.write_text(textwrap.dedent(f"""\
            spool: {node_spool}
            host: node{n}
            queues:
              datasets:
                settle: 0s
                concurrency: {items}
                retry: {{attempts: 5, delays: [0s]}}
                chain:
                  - checksum: {{algorithms: [sha256]}}
                  - publish:
                      to: 's3://{bucket}/rooms/r1/manifest.json'
                      endpoint_url: '{moto_s3}'
                      set: {{'datasets.{{name}}': {{sha256: '{{sha256}}', host: '{{host}}'}}}}
            """))  # fmt: skip
        started.append(daemon(config, env=S3_ENV, wait=False))
    for process, node_spool in zip(started, spools, strict=True):
        process.wait_ready(node_spool)
    for n, node_spool in enumerate(spools):
        for i in range(items):
            drop(node_spool, f"n{n}_{i}", os.urandom(64))
    conflicts = 0
    for n, node_spool in enumerate(spools):
        for i in range(items):
            doc = wait_for(sidecar_state(node_spool, "datasets", f"n{n}_{i}", "done"), 40, f"n{n}_{i} published")
            conflicts += doc["steps"][1]["result"]["conflicts"]
    body = boto3.client("s3", endpoint_url=moto_s3).get_object(Bucket=bucket, Key="rooms/r1/manifest.json")["Body"]
    datasets = json.loads(body.read())["datasets"]
    assert set(datasets) == {f"n{n}_{i}" for n in range(nodes) for i in range(items)}, "an update was lost"
    assert {datasets[f"n{n}_0"]["host"] for n in range(nodes)} == {f"node{n}" for n in range(nodes)}
    print(f"s3:// {nodes * items} updates from {nodes} daemons x {items} items at once: {conflicts} conflicts")
    sidecar = read_sidecar(spools[0], "datasets", "n0_0")
    assert sidecar is not None and sidecar["steps"][1]["result"]["version"].strip('"')
