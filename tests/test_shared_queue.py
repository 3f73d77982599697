"""Shared queues (SPEC section 6, issue #14): several nodes share one queue through an S3 prefix.

Every daemon is a real `spoold run` subprocess on its own local spool with its own top-level `host:`; the
store is moto's S3 server (the session fixture `moto_s3`), run through tests/moto_launcher.py, which
serialises moto's `put_object`: moto checks `If-None-Match` / `If-Match` and then writes in two steps, so
without the launcher two racing claims could both win on moto although real S3 lets only one. A double
claim seen here is spoold's, not moto's. Items are put into `<prefix>inbox/` with boto3 directly, as a
producer would, and the outcome is read from the bucket (`done/`, `failed/`, `status/`, `claims/`), from
the chain's own log (an `exec` appending "name host" per run) and from moto's request log.

- 300 items over three nodes: each exactly once (log, done/, status), spread over the nodes, nothing left.
- One node SIGKILLed and another cut off from the store (tests/netproxy.py, blackholed) for longer than
  the lease: nothing lost, done/ written once per item, orphaned claims taken over by a survivor.
- A store that ignores conditional writes is refused at start (exit 78), before any claim.
- A bundle (prefix + `<name>.ready` with JSON fields): its tree and its fields reach the chain; a folder
  put with `spoold drop` arrives as a bundle. `keep: {done: delete}` deletes the inbox objects instead.
- Bad inbox entries (control character, 300-byte name, 1.1 MiB marker, an object deleted between list
  and get) never stop the daemon or show a traceback; each is failed or skipped with a reason.
- A failing chain ends in failed/; `spoold retry` (from any node's config) runs it again.
- `spoold drop` into the bucket, `spoold status --json` with the holding node, health and metrics counters.

Timings: lease 5 s (the smallest allowed), poll 0.5 s, objects of a few bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from torture.clock import SHIM, faketime_library

from spoold.fsio import parse_iso
from tests.conftest import DaemonProcess, need_or_skip, wait_for
from tests.shared_fixtures import (
    S3_ENV,
    HttpProxy,
    Partition,
    SharedBucket,
    local_claims,
    moto_requests,
    node_config,
    queue_yaml,
    read_health,
    shared_claims,
    spool_of,
    writes_by_key,
)

Start = Callable[..., DaemonProcess]
LEASE_SECONDS = 5.0
EX_CONFIG = 78


@pytest.fixture
def bucket(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> SharedBucket:
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    return SharedBucket(moto_s3, f"spoold-shared-{uuid.uuid4().hex[:12]}").create()


@pytest.fixture
def closing() -> Iterator[list[Any]]:
    """Proxies to close at the end of the test, however it ends (after the daemons are stopped: LIFO fixtures)."""
    made: list[Any] = []
    yield made
    for thing in reversed(made):
        thing.close()


def start_nodes(daemon: Start, configs: list[Path]) -> list[DaemonProcess]:
    """Start every node at once, then wait until each is ready (each on its own spool)."""
    nodes = [daemon(config, env=S3_ENV, wait=False) for config in configs]
    for node, config in zip(nodes, configs, strict=True):
        node.wait_ready(spool_of(config), timeout=30)
    return nodes


def spoold(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **S3_ENV, "COLUMNS": "200"}, stdin=subprocess.DEVNULL)  # fmt: skip


def exec_runs(log: Path) -> list[tuple[str, str]]:
    """(item, host) per run of the chain, from the lines `echo "{name} {host}" >> LOG` appended."""
    if not log.exists():
        return []
    return [tuple(line.split(" ", 1)) for line in log.read_text().splitlines() if line]  # type: ignore[misc]


def append_argv(log: Path, then: str = "") -> list[str]:
    return ["/bin/sh", "-c", f'echo "{{name}} {{host}}" >> {log}{then}']


def claim_names(bucket: SharedBucket) -> set[str]:
    return {key[: -len(".json")] for key in bucket.keys("claims/") if key.endswith(".json")}


def item_names(keys: list[str]) -> set[str]:
    """The items a listing shows: a file item's key, or a bundle's `<name>.ready` (its files lie below `<name>/`)."""
    return {key[: -len(".ready")] if key.endswith(".ready") else key for key in keys if "/" not in key}


def wait_finished(bucket: SharedBucket, names: list[str], state: str, area: str, timeout: float) -> dict[str, Any]:
    """Wait until every item is in `area` (done/ or failed/), the inbox is empty, no item is claimed and every
    status document says `state`; the status documents by name."""
    want = set(names)
    wait_for(lambda: want <= item_names(bucket.keys(f"{area}/")), timeout, f"{len(want)} items in {area}/",
             interval=0.5)  # fmt: skip
    try:
        wait_for(lambda: not bucket.keys("inbox/"), 15, "an empty inbox", interval=0.5)
    except AssertionError:
        raise AssertionError(f"left in the inbox: {bucket.keys('inbox/')[:10]}") from None
    try:
        wait_for(lambda: not (claim_names(bucket) & want), 15, "no claim left", interval=0.5)
    except AssertionError:
        left = {name: claim.get("node") for name, claim in bucket.claims().items() if name in want}
        raise AssertionError(f"claims left after every item was in {area}/: {left}") from None
    statuses: dict[str, Any] = {}

    def all_final() -> bool:
        missing = [n for n in names if (statuses.get(n) or {}).get("state") != state]
        for rel, doc in bucket.get_json_many(f"status/{n}.json" for n in missing).items():
            statuses[rel[len("status/"): -len(".json")]] = doc
        return all((statuses.get(n) or {}).get("state") == state for n in names)

    try:
        wait_for(all_final, 15, f"every status/<name>.json saying {state}", interval=0.5)
    except AssertionError:
        shown = {n: (statuses.get(n) or {}).get("state") for n in names}
        wrong = {n: found for n, found in shown.items() if found != state}
        raise AssertionError(f"status documents not {state}: {dict(list(wrong.items())[:10])}") from None
    # Read again: a late write (a throttled `running` overtaking the final one) must not undo the end.
    again = {rel[len("status/"): -len(".json")]: doc for rel, doc in
             bucket.get_json_many(f"status/{n}.json" for n in names).items()}  # fmt: skip
    if wrong := {n: (doc or {}).get("state") for n, doc in again.items() if (doc or {}).get("state") != state}:
        raise AssertionError(f"status documents {state}, then not: {dict(list(wrong.items())[:10])}")
    return again


def finished_or_noted(bucket: SharedBucket, names: list[str], problems: list[str]) -> dict[str, Any]:
    """`wait_finished` for done/, with a failure noted in `problems` (the other checks still run) instead."""
    try:
        return wait_finished(bucket, names, "done", "done", 60)
    except AssertionError as exc:
        problems.append(str(exc))
        return {}


def assert_clean_logs(nodes: list[DaemonProcess]) -> None:
    for node in nodes:
        text = node.log()
        assert "Traceback" not in text, f"{node.log_path.name} shows a traceback:\n{text[-3000:]}"


# ---- three nodes, one bucket --------------------------------------------------------------------------------------


def test_three_nodes_do_300_items_exactly_once(bucket: SharedBucket, daemon: Start, tmp_path: Path,
                                               moto_s3_log: Path) -> None:  # fmt: skip
    log = tmp_path / "exec.log"
    hosts = ["node-a", "node-b", "node-c"]
    configs = [node_config(tmp_path, host, bucket, argv=append_argv(log)) for host in hosts]
    nodes = start_nodes(daemon, configs)
    names = [f"item-{n:03d}" for n in range(300)]
    started = time.monotonic()
    bucket.put_many((f"inbox/{name}", f"{name}\n".encode()) for name in names)
    # Every check runs and every problem is reported together: one failure must not hide another.
    problems: list[str] = []
    statuses = finished_or_noted(bucket, names, problems)
    elapsed = time.monotonic() - started

    runs = exec_runs(log)
    per_item = Counter(name for name, _ in runs)
    if set(per_item) != set(names) or set(per_item.values()) != {1}:
        problems.append(f"run more than once: {[n for n, c in per_item.items() if c > 1][:10]}, never: "
                        f"{sorted(set(names) - set(per_item))[:10]}")  # fmt: skip
    by_host = Counter(host for _, host in runs)
    if set(by_host) != set(hosts):
        problems.append(f"work not spread over the three nodes: {dict(by_host)}")
    if statuses and Counter(doc.get("node") for doc in statuses.values()) != by_host:
        problems.append("status `node` is not the host that ran the item")
    if statuses and not all(doc.get("item") == n and doc.get("host") == doc.get("node") for n, doc in statuses.items()):
        problems.append("status `item` / `host` do not match the item and its node")
    bodies = bucket.get_many(f"done/{name}" for name in names)
    if wrong := [n for n in names if bodies[f"done/{n}"] != f"{n}\n".encode()]:
        problems.append(f"done/ does not hold the items as put: {wrong[:10]}")
    writes = writes_by_key(moto_requests(moto_s3_log, bucket.name), f"{bucket.prefix}done/")
    if writes != {f"{bucket.prefix}done/{name}": 1 for name in names}:
        problems.append(f"done/ not written once per item: {({k: v for k, v in writes.items() if v != 1})}")
    if failed := bucket.keys("failed/"):
        problems.append(f"in failed/: {failed[:10]}")

    def counters() -> list[dict[str, int]] | None:
        found = [shared_claims(spool_of(config)) for config in configs]
        # A node may win a claim on an item that another node finished since its listing; it then drops it.
        return found if sum(c.get("won", 0) for c in found) >= len(names) else None

    try:
        claims = wait_for(counters, 15, "health.json claims.won adding up to at least 300", interval=0.25)
        if not all(c.get("won", 0) > 0 for c in claims) or sum(c.get("taken_over", 0) for c in claims):
            problems.append(f"health.json claims: {claims}")
    except AssertionError as exc:
        problems.append(str(exc))
    for config, host in zip(configs, hosts, strict=True):
        shared = read_health(spool_of(config)).get("shared", {}).get("jobs", {})
        if shared.get("node") != host or shared.get("source") != bucket.url:
            problems.append(f"health.json shared.jobs of {host}: {shared}")
    for node in nodes:
        if "Traceback" in node.log():
            problems.append(f"{node.log_path.name} shows a traceback")
    print(f"300 items over 3 nodes in {elapsed:.1f} s ({len(names) / elapsed:.0f} items/s): {dict(by_host)}")
    assert not problems, "\n".join(problems)


# ---- a node killed, a node cut off ---------------------------------------------------------------------------------


def test_a_killed_node_and_a_cut_off_node_lose_nothing(bucket: SharedBucket, daemon: Start, tmp_path: Path,
                                                       moto_s3_log: Path, closing: list[Any]) -> None:  # fmt: skip
    """node-a is SIGKILLed while it holds claims; node-b's link to the store is blackholed (wedged, then cut when
    it comes back) until its claims have been taken over, so for longer than the lease. node-c carries on.
    Only items node-a or node-b held may have run twice; done/ is written once per item all the same."""
    log = tmp_path / "exec.log"
    partition = Partition(bucket.endpoint)
    closing.append(partition)
    slow = append_argv(log, "; sleep 0.1")  # so that a node holds claims at any instant
    configs = [node_config(tmp_path, "node-a", bucket, argv=slow),
               node_config(tmp_path, "node-b", bucket, argv=slow, endpoint=partition.endpoint),
               node_config(tmp_path, "node-c", bucket, argv=slow)]  # fmt: skip
    node_a, node_b, node_c = start_nodes(daemon, configs)
    spool_a, spool_b, spool_c = (spool_of(config) for config in configs)
    names = [f"item-{n:03d}" for n in range(150)]
    bucket.put_many((f"inbox/{name}", b"x") for name in names)

    def running_everywhere() -> bool:
        hosts = Counter(host for _, host in exec_runs(log))
        return min(hosts.get(h, 0) for h in ("node-a", "node-b", "node-c")) >= 3 and bool(
            local_claims(spool_a)) and bool(local_claims(spool_b))  # fmt: skip

    wait_for(running_everywhere, 30, "every node running items, node-a and node-b holding claims", interval=0.05)
    node_a.kill()
    partition.down()
    cut_at = time.monotonic()
    held_by = {"node-a": local_claims(spool_a), "node-b": local_claims(spool_b)}
    orphaned = {name for name, claim in bucket.claims().items() if claim.get("node") in held_by}
    for name, claim in bucket.claims().items():
        if claim.get("node") in held_by:
            held_by[claim["node"]].add(name)
    assert orphaned, "neither node-a nor node-b held a claim in the bucket when they went (the test's premise)"
    done_at_cut = set(bucket.keys("done/"))

    def taken_over() -> bool:
        held_by["node-b"] |= local_claims(spool_b)  # anything node-b thought it got while cut off
        claims = bucket.claims()
        left = [n for n in orphaned - done_at_cut if claims.get(n, {}).get("node") in ("node-a", "node-b")]
        is_long = time.monotonic() - cut_at > LEASE_SECONDS + 1
        return is_long and not left and shared_claims(spool_c).get("taken_over", 0) > 0

    wait_for(taken_over, 6 * LEASE_SECONDS, "node-c taking over the orphaned claims", interval=0.25)
    cut_seconds = time.monotonic() - cut_at
    partition.heal()

    # Every check runs and every problem is reported together: one failure must not hide another.
    problems: list[str] = []
    statuses = finished_or_noted(bucket, names, problems)
    for node in (node_b, node_c):
        if node.process is None or node.process.poll() is not None:
            problems.append(f"{node.log_path.name} stopped:\n{node.log()[-2000:]}")
    writes = writes_by_key(moto_requests(moto_s3_log, bucket.name), f"{bucket.prefix}done/")
    if missing := {n for n in names if f"{bucket.prefix}done/{n}" not in writes}:
        problems.append(f"never written to done/: {sorted(missing)[:10]}")
    if twice := {k[len(bucket.prefix):]: v for k, v in writes.items() if v != 1}:
        problems.append(f"done/ written more than once: {twice}")
    if failed := bucket.keys("failed/"):
        problems.append(f"in failed/: {failed[:10]}")
    per_item = Counter(name for name, _ in exec_runs(log))
    if never := set(names) - set(per_item):
        problems.append(f"never run: {sorted(never)[:10]}")
    again = {n for n, count in per_item.items() if count > 1}
    orphans = held_by["node-a"] | held_by["node-b"]
    if again - orphans:
        problems.append(f"run twice though neither the killed nor the cut-off node held them: {again - orphans}")
    for name in orphans - done_at_cut:
        if name in statuses and statuses[name].get("node") == "node-a":
            problems.append(f"{name}: status says the killed node-a finished it")
    survivors = shared_claims(spool_b).get("taken_over", 0) + shared_claims(spool_c).get("taken_over", 0)
    if not survivors > 0:
        problems.append("no survivor counts a claim taken over in health.json")
    for node in (node_b, node_c):
        if "Traceback" in node.log():
            problems.append(f"{node.log_path.name} shows a traceback")
    print(f"killed node-a holding {sorted(held_by['node-a'])}, cut node-b {cut_seconds:.1f} s holding "
          f"{sorted(held_by['node-b'])}; ran twice: {sorted(again)}")  # fmt: skip
    assert not problems, "\n".join(problems)


# ---- a store without conditional writes ----------------------------------------------------------------------------


def test_a_store_that_ignores_conditions_is_refused_at_start(bucket: SharedBucket, tmp_path: Path,
                                                             closing: list[Any]) -> None:  # fmt: skip
    """The proxy forwards everything to moto but drops `If-None-Match` and `If-Match`: every write wins."""
    forwarded: list[tuple[str, str]] = []
    proxy = HttpProxy(bucket.endpoint, strip={"if-none-match", "if-match"},
                      before=lambda method, _bucket, key: forwarded.append((method, key)))  # fmt: skip
    closing.append(proxy)
    config = node_config(tmp_path, "node-a", bucket, argv=append_argv(tmp_path / "exec.log"),
                         endpoint=proxy.endpoint)  # fmt: skip
    bucket.put("inbox/item-1", b"x")
    result = spoold("run", "-c", str(config), timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == EX_CONFIG, f"exit {result.returncode}:\n{output[-3000:]}"
    assert "conditional" in output.lower(), f"the error names conditional writes:\n{output[-3000:]}"
    assert "Traceback" not in output
    assert proxy.stripped > 0, "the probe sent a conditional write"
    claim_key = f"{bucket.prefix}claims/item-1.json"
    assert ("PUT", claim_key) not in forwarded and "item-1" not in claim_names(bucket), "no claim is made"
    assert bucket.keys("inbox/") == ["item-1"] and bucket.get("status/item-1.json") is None
    assert not (tmp_path / "exec.log").exists()


# ---- bundles ------------------------------------------------------------------------------------------------------


def test_a_bundle_brings_its_tree_and_its_marker_fields(bucket: SharedBucket, daemon: Start, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    eps, drops = bucket.at("eps/"), bucket.at("drops/")
    with_fields = ["/bin/sh", "-c", f'cd "{{path}}" && find . -type f | LC_ALL=C sort > {out}/{{name}}.files && '
                   f'echo "{{repo_id}} {{episode_index}} {{host}}" > {out}/{{name}}.fields']  # fmt: skip
    tree_only = ["/bin/sh", "-c", f'cd "{{path}}" && find . -type f | LC_ALL=C sort > {out}/{{name}}.files']
    config = node_config(tmp_path, "node-a", eps, queue="eps", argv=with_fields, items="bundles",
                         more_queues=[queue_yaml("drops", drops, argv=tree_only, items="bundles")])  # fmt: skip
    [node] = start_nodes(daemon, [config])
    eps.put_many([("inbox/ep1/cam_left/0001.png", b"L1"), ("inbox/ep1/cam_left/0002.png", b"L2"),
                  ("inbox/ep1/meta.txt", b"m")])  # fmt: skip
    eps.put("inbox/ep1.ready", json.dumps({"repo_id": "lab-set", "episode_index": 7}).encode())

    folder = tmp_path / "session9"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"a")
    (folder / "sub" / "b.bin").write_bytes(b"b")
    dropped = spoold("drop", "-c", str(config), "drops", str(folder))
    assert dropped.returncode == 0, dropped.stderr

    [status] = wait_finished(eps, ["ep1"], "done", "done", 30).values()
    assert (out / "ep1.files").read_text().split() == ["./cam_left/0001.png", "./cam_left/0002.png", "./meta.txt"]
    assert (out / "ep1.fields").read_text().split() == ["lab-set", "7", "node-a"], "marker fields reach {field}"
    assert status["fields"]["repo_id"] == "lab-set" and status["fields"]["episode_index"] == 7
    assert status["kind"] == "bundle" and status["node"] == "node-a"
    assert sorted(eps.keys("done/")) == ["ep1.ready", "ep1/cam_left/0001.png", "ep1/cam_left/0002.png",
                                         "ep1/meta.txt"], "done/ has the same layout as the inbox"  # fmt: skip
    assert json.loads(eps.get("done/ep1.ready") or b"") == {"repo_id": "lab-set", "episode_index": 7}

    wait_finished(drops, ["session9"], "done", "done", 30)
    assert (out / "session9.files").read_text().split() == ["./a.bin", "./sub/b.bin"]
    assert sorted(drops.keys("done/")) == ["session9.ready", "session9/a.bin", "session9/sub/b.bin"]
    assert drops.get("done/session9/sub/b.bin") == b"b"
    assert_clean_logs([node])


def test_keep_done_delete_leaves_nothing_in_the_bucket_but_the_status(bucket: SharedBucket, daemon: Start,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    log = tmp_path / "exec.log"
    config = node_config(tmp_path, "node-a", bucket, argv=append_argv(log), extra="keep: {done: delete}")
    [node] = start_nodes(daemon, [config])
    bucket.put_many([("inbox/one", b"1"), ("inbox/two", b"2")])
    wait_for(lambda: len(exec_runs(log)) == 2 and not bucket.keys("inbox/") and not claim_names(bucket), 30,
             "both run, the inbox empty, no claims", interval=0.5)  # fmt: skip

    def both_done() -> bool:
        docs = bucket.get_json_many(["status/one.json", "status/two.json"]).values()
        return all(isinstance(doc, dict) and doc.get("state") == "done" for doc in docs)

    wait_for(both_done, 15, "both status documents done", interval=0.5)
    assert not bucket.keys("done/") and not bucket.keys("failed/"), "keep: {done: delete} deletes, moves nothing"
    assert sorted(exec_runs(log)) == [("one", "node-a"), ("two", "node-a")]
    assert_clean_logs([node])


# ---- hostile input ------------------------------------------------------------------------------------------------


def test_bad_inbox_entries_never_stop_the_daemon(bucket: SharedBucket, daemon: Start, tmp_path: Path,
                                                 closing: list[Any]) -> None:  # fmt: skip
    """A key with a control character, a 300-byte name, a 1.1 MiB ready marker, and an object that the proxy
    in front of moto deletes when the daemon first fetches it (after it was listed). Each ends in failed/ or is
    skipped with its reason in the log; good items around them are done; the daemon never stops."""
    eps = bucket.at("eps/")
    vanished: list[str] = []

    def delete_on_fetch(method: str, _bucket: str, key: str) -> None:
        if method in ("GET", "HEAD") and key == f"{bucket.prefix}inbox/victim" and not vanished:
            vanished.append(method)
            bucket.delete("inbox/victim")

    proxy = HttpProxy(bucket.endpoint, before=delete_on_fetch)
    closing.append(proxy)
    log = tmp_path / "exec.log"
    config = node_config(tmp_path, "node-a", bucket, argv=append_argv(log), endpoint=proxy.endpoint,
                         more_queues=[queue_yaml("eps", eps, argv=append_argv(log), items="bundles",
                                                 endpoint=proxy.endpoint)])  # fmt: skip
    [node] = start_nodes(daemon, [config])
    control, long_name = "ctl\x07name", "x" * 300
    bucket.put_many([(f"inbox/{control}", b"c"), (f"inbox/{long_name}", b"l"), ("inbox/victim", b"v"),
                     ("inbox/good-1", b"g")])  # fmt: skip
    eps.put_many([("inbox/big/a.txt", b"a"), ("inbox/big.ready", b'{"pad": "' + b"p" * (1100 * 1024) + b'"}'),
                  ("inbox/fine/a.txt", b"a"), ("inbox/fine.ready", b'{"k": "v"}')])  # fmt: skip

    wait_for(lambda: "good-1" in bucket.keys("done/"), 30, "good-1 done", interval=0.5)
    wait_for(lambda: "fine.ready" in eps.keys("done/"), 30, "the good bundle done", interval=0.5)
    assert vanished, "the daemon fetched the victim after listing it"

    def settled(area: SharedBucket, name: str, hint: str) -> bool:
        """Failed (failed/ or a failed status), or still in the inbox or gone with its reason in the log."""
        doc = area.get_json(f"status/{name}.json") if len(name) < 900 else None
        if any(k == name or k.startswith(f"{name}/") or k == f"{name}.ready" for k in area.keys("failed/")):
            return True
        if isinstance(doc, dict) and doc.get("state") == "failed":
            return True
        # A log line of the daemon's own (not a traceback's) that names it and is not just the claim.
        return any(hint in line and line.startswith("20") and "claimed" not in line for line in node.log().splitlines())

    # Every check runs and every problem is reported: one bad entry's failure must not hide another's.
    problems: list[str] = []
    for area, name, hint in ((bucket, control, "ctl"), (bucket, long_name, "x" * 40), (bucket, "victim", "victim"),
                             (eps, "big", "big")):  # fmt: skip
        try:
            wait_for(lambda a=area, n=name, h=hint: settled(a, n, h), 20, f"{name[:20]!r} failed or skipped "
                     "with a reason", interval=0.5)  # fmt: skip
        except AssertionError as exc:
            problems.append(str(exc))
    big = eps.get_json("status/big.json")
    if isinstance(big, dict) and not (big["state"] == "failed" and big.get("error")):
        problems.append(f"a 1.1 MiB marker is a rejection with the reason, not {big['state']}")
    try:
        wait_for(lambda: not claim_names(bucket) and not claim_names(eps), 15, "no claim left", interval=0.5)
    except AssertionError:
        left = sorted(claim_names(bucket) | claim_names(eps))
        problems.append(f"claims left in the bucket: {[n if len(n) < 40 else f'{n[:20]}...({len(n)})' for n in left]}")
    ran = {name for name, _ in exec_runs(log)}
    if ran != {"good-1", "fine"}:
        problems.append(f"only the good items run, not {ran}")
    if node.process is None or node.process.poll() is not None:
        problems.append("the daemon stopped")
    else:
        bucket.put("inbox/good-2", b"g")
        try:
            wait_for(lambda: "good-2" in bucket.keys("done/"), 20, "good-2 done after the bad ones", interval=0.5)
        except AssertionError as exc:
            problems.append(str(exc))
        if read_health(spool_of(config)).get("ready") is not True:
            problems.append("health.json says not ready")
    text = node.log()
    if "Traceback" in text:
        lines = text.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("Traceback"))
        raised = next((ln for ln in lines[at:] if ln and not ln.startswith((" ", "Traceback"))), "")
        problems.append(f"a traceback in the log: {lines[at - 1][:160]!r} ... {raised[:300]!r}")
    if "\x07" in text:
        problems.append(f"a raw control character in the log: {[ln for ln in text.splitlines() if chr(7) in ln][:2]}")
    assert not problems, "\n".join(problems)


# ---- failure and retry --------------------------------------------------------------------------------------------


def test_a_failing_chain_goes_to_failed_and_retry_runs_it_again(bucket: SharedBucket, daemon: Start,
                                                                tmp_path: Path) -> None:  # fmt: skip
    log, fixed = tmp_path / "exec.log", tmp_path / "fixed"
    argv = ["/bin/sh", "-c", f'test -e {fixed} && echo "{{name}} {{host}}" >> {log}']  # exit 1 until `fixed` exists
    config = node_config(tmp_path, "node-a", bucket, argv=argv)
    other = node_config(tmp_path, "node-b", bucket, argv=argv)  # never started: retry works from any node
    [node] = start_nodes(daemon, [config])
    bucket.put("inbox/item-1", b"one")
    [failed] = wait_finished(bucket, ["item-1"], "failed", "failed", 30).values()
    assert failed["error"] and failed["error"]["step"] and failed["node"] == "node-a"
    assert bucket.keys("failed/") == ["item-1"] and not bucket.keys("done/")
    assert not log.exists()

    fixed.touch()
    result = spoold("retry", "-c", str(other), "jobs", "item-1")
    assert result.returncode == 0, result.stderr
    [done] = wait_finished(bucket, ["item-1"], "done", "done", 30).values()
    assert not bucket.keys("failed/") and bucket.get("done/item-1") == b"one"
    assert exec_runs(log) == [("item-1", "node-a")]
    assert done["error"] is None
    missing = spoold("retry", "-c", str(other), "jobs", "no-such-item")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert_clean_logs([node])


# ---- the command line, health, metrics ----------------------------------------------------------------------------


def status_items(config: Path, queue: str = "jobs") -> dict[str, dict[str, Any]]:
    """`spoold status -c CFG QUEUE --json`: item name -> entry. The contract's shape is {"queue", "items": [...]};
    the local queues' shape ({"queues": {q: {"items": [...]}}}) is read as well."""
    result = spoold("status", "-c", str(config), queue, "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    items = doc["items"] if "items" in doc else doc["queues"][queue]["items"]
    return {entry["item"]: entry for entry in items}


def test_drop_status_health_and_metrics(bucket: SharedBucket, daemon: Start, tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    log = tmp_path / "exec.log"
    config = node_config(tmp_path, "node-a", bucket, argv=append_argv(log))
    bucket.put("inbox/early", b"e")
    before = status_items(config)
    assert before["early"]["state"] == "queued" and not before["early"].get("node"), "listed from the bucket"

    [node] = start_nodes(daemon, [config])
    source = tmp_path / "hello.txt"
    source.write_bytes(b"hello\n")
    dropped = spoold("drop", "-c", str(config), "jobs", str(source))
    assert dropped.returncode == 0, dropped.stderr
    wait_finished(bucket, ["early", "hello.txt"], "done", "done", 30)
    assert bucket.get("done/hello.txt") == b"hello\n" and source.exists()

    after = status_items(config)
    assert {name: (entry["state"], entry["node"]) for name, entry in after.items()} == {
        "early": ("done", "node-a"), "hello.txt": ("done", "node-a")}  # fmt: skip
    one = spoold("status", "-c", str(config), "jobs", "hello.txt", "--json")
    assert one.returncode == 0, one.stderr
    document = json.loads(one.stdout)
    assert (document["item"], document["state"], document["node"]) == ("hello.txt", "done", "node-a")
    table = spoold("status", "-c", str(config), "jobs")
    assert table.returncode == 0 and "hello.txt" in table.stdout and "node-a" in table.stdout, table.stdout

    def samples() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        try:
            text = (spool_of(config) / "metrics.prom").read_text()
        except FileNotFoundError:
            return None
        found = {(s.name, frozenset(s.labels.items())): s.value
                 for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip
        won = found.get(("spoold_claims_total", frozenset({("queue", "jobs"), ("result", "won")})), 0)
        return found if won >= 2 else None

    metrics = wait_for(samples, 15, 'spoold_claims_total{queue="jobs",result="won"} >= 2', interval=0.25)
    assert metrics.get(("spoold_shared_items", frozenset({("queue", "jobs")}))) is not None
    for result in ("lost", "renewed", "taken_over"):
        assert ("spoold_claims_total", frozenset({("queue", "jobs"), ("result", result)})) in metrics
    shared = read_health(spool_of(config))["shared"]["jobs"]
    assert shared["node"] == "node-a" and shared["source"] == bucket.url and shared["claims"]["won"] >= 2
    assert sorted(exec_runs(log)) == [("early", "node-a"), ("hello.txt", "node-a")]
    assert_clean_logs([node])


# ---- clocks that disagree -----------------------------------------------------------------------------------------


def test_a_node_whose_clock_is_minutes_ahead_takes_nothing_over(bucket: SharedBucket, daemon: Start,
                                                               tmp_path: Path) -> None:  # fmt: skip
    """Leases are judged by the store's clock: a node 4 minutes ahead (48 leases) must not read the other's fresh
    claims as stale. The node runs under libfaketime with its monotonic clock left alone, as an NTP step would."""
    library = faketime_library()
    if library is None:
        need_or_skip("libfaketime is not installed (apt-get install faketime; `make test` does)")
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SHIM)
    log = tmp_path / "exec.log"
    slow = append_argv(log, "; sleep 0.3")  # every claim is held for a while, renewed, and visible to the other
    ahead = daemon(node_config(tmp_path, "node-ahead", bucket, argv=slow), wait=False, env={
        **S3_ENV, "LD_PRELOAD": str(library), "FAKETIME": "+4m", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        "PYTHONPATH": f"{shim}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})  # fmt: skip
    behind = daemon(node_config(tmp_path, "node-true", bucket, argv=slow), wait=False, env=S3_ENV)
    for node, host in ((ahead, "node-ahead"), (behind, "node-true")):
        node.wait_ready(tmp_path / host / "spool", timeout=30)
    heartbeat = parse_iso(read_health(tmp_path / "node-ahead" / "spool")["heartbeat"])
    assert heartbeat is not None and heartbeat - time.time() > 180, "the node's clock is not ahead: no skew tested"
    names = [f"skew-{n:02d}" for n in range(40)]
    bucket.put_many((f"inbox/{name}", b"x") for name in names)
    wait_finished(bucket, names, "done", "done", 60)
    runs = Counter(name for name, _ in exec_runs(log))
    assert runs == Counter(names), f"run twice or never: {[(n, c) for n, c in runs.items() if c != 1]}"
    assert {host for _, host in exec_runs(log)} == {"node-ahead", "node-true"}
    for host in ("node-ahead", "node-true"):
        claims = read_health(tmp_path / host / "spool")["shared"]["jobs"]["claims"]
        assert claims["taken_over"] == 0 and claims["lost"] == 0, (host, claims)
    assert_clean_logs([ahead, behind])
