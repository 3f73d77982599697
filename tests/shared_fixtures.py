"""Helpers for the shared-queue tests and bench (issue #14): the bucket, node configs, and proxies in front of moto.

- `SharedBucket`: one bucket + prefix laid out as SPEC section 6 "Shared queues" says (`inbox/`, `claims/`,
  `status/`, `done/`, `failed/`), read and written with boto3 directly, as a producer or an operator would.
- `node_config`: the YAML of one node (its own spool, its own top-level `host:`) sharing a queue.
- `HttpProxy`: an HTTP/1.1 forwarder in front of moto that can drop request headers (a store that ignores
  `If-None-Match` / `If-Match`), run a hook before forwarding (delete an object between list and get), and
  counts the requests it forwarded.
- `Partition`: tests/netproxy.py's TCP `Proxy` with a switch: `down()` wedges the open connections and every
  new one (a blackholed link, nothing refused, nothing answered), `heal()` cuts them all so the client sees
  the link come back.
- `moto_requests`: the requests moto's werkzeug log recorded for one bucket (method, key, query, status).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import textwrap
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self
from urllib.parse import unquote, urlsplit

from tests.netproxy import Proxy

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
                        "transfer-encoding", "upgrade", "expect", "content-length"})  # fmt: skip


# ---- the bucket ---------------------------------------------------------------------------------------------------


@dataclass
class SharedBucket:
    """A bucket and the shared queue's prefix in it (ends with '/'); keys below are relative to the prefix."""

    endpoint: str
    name: str
    prefix: str = "jobs/"
    _client: Any = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    @property
    def client(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                        config=Config(max_pool_connections=16))  # fmt: skip
        return self._client

    def at(self, prefix: str) -> SharedBucket:
        """The same bucket (and client) with another queue's prefix."""
        return SharedBucket(self.endpoint, self.name, prefix, self._client)

    def create(self) -> Self:
        self.client.create_bucket(Bucket=self.name)
        return self

    def put(self, rel: str, body: bytes) -> None:
        self.client.put_object(Bucket=self.name, Key=self.prefix + rel, Body=body)

    def put_many(self, items: Iterable[tuple[str, bytes]]) -> None:
        with ThreadPoolExecutor(8) as pool:
            for future in [pool.submit(self.put, rel, body) for rel, body in items]:
                future.result()

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.name, Key=self.prefix + rel)

    def keys(self, under: str) -> list[str]:
        """Keys below `prefix + under`, relative to that (so `keys("done/")` gives item names for file items)."""
        start = self.prefix + under
        found: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=start):
            found.extend(entry["Key"][len(start):] for entry in page.get("Contents", []))
        return found

    def get(self, rel: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.name, Key=self.prefix + rel)["Body"].read()  # type: ignore[no-any-return]
        except self.client.exceptions.NoSuchKey:
            return None

    def get_json(self, rel: str) -> Any:
        body = self.get(rel)
        return None if body is None else json.loads(body)

    def get_many(self, rels: Iterable[str]) -> dict[str, bytes | None]:
        rels = list(rels)
        with ThreadPoolExecutor(8) as pool:
            return dict(zip(rels, pool.map(self.get, rels), strict=True))

    def get_json_many(self, rels: Iterable[str]) -> dict[str, Any]:
        rels = list(rels)
        with ThreadPoolExecutor(8) as pool:
            return dict(zip(rels, pool.map(self.get_json, rels), strict=True))

    def claims(self) -> dict[str, dict[str, Any]]:
        """Item name -> claim document, for every `claims/<name>.json` now (a claim deleted meanwhile is left out)."""
        names = [key[: -len(".json")] for key in self.keys("claims/") if key.endswith(".json") and "/" not in key]
        documents = self.get_json_many(f"claims/{name}.json" for name in names)
        return {name: doc for name, doc in zip(names, documents.values(), strict=True) if isinstance(doc, dict)}


# ---- node configs -------------------------------------------------------------------------------------------------


def argv_yaml(argv: list[str]) -> str:
    """An argv list as YAML (JSON is YAML): no quoting surprises for shell snippets with quotes in them."""
    return json.dumps(argv)


def queue_yaml(queue: str, bucket: SharedBucket, *, argv: list[str], endpoint: str | None = None,
               items: str = "files", concurrency: int = 2, lease: str = "5s", poll: str = "0.5s",
               extra: str = "", steps: Iterable[str] = ()) -> list[str]:  # fmt: skip
    """The lines of one shared queue under `queues:`; `extra`: more keys of the queue (YAML, dedented); `steps`:
    the chain as YAML flow steps (`checksum: {algorithms: [sha256]}`), else one `exec` of `argv`."""
    lines = [f"  {queue}:", f"    source: '{bucket.url}'", f"    endpoint_url: '{endpoint or bucket.endpoint}'",
             "    region: us-east-1", f"    claim: {{lease: {lease}}}", f"    poll: {poll}", f"    items: {items}",
             f"    concurrency: {concurrency}", "    retry: {attempts: 1, delays: [0s]}"]  # fmt: skip
    lines += ["    " + line for line in textwrap.dedent(extra).splitlines()]
    chain = list(steps) or [f"exec: {{argv: {argv_yaml(argv)}, timeout: 30s}}"]
    return [*lines, "    chain:", *(f"      - {step}" for step in chain)]


def node_config(folder: Path, host: str, bucket: SharedBucket, *, queue: str = "jobs",
                more_queues: Iterable[list[str]] = (), **options: Any) -> Path:  # fmt: skip
    """Write `folder/<host>.yaml`: a node with spool `folder/<host>/spool` sharing `bucket` as `queue`
    (`options` as `queue_yaml` takes them), plus `more_queues` (from `queue_yaml`)."""
    lines = [f"host: {host}", f"spool: {folder / host / 'spool'}", "queues:", *queue_yaml(queue, bucket, **options)]
    for more in more_queues:
        lines += more
    path = folder / f"{host}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def spool_of(config: Path) -> Path:
    return config.parent / config.stem / "spool"


def read_health(spool: Path) -> dict[str, Any]:
    try:
        doc = json.loads((spool / "health.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def shared_claims(spool: Path, queue: str = "jobs") -> dict[str, int]:
    """health.json's `shared.<queue>.claims` counters ({} until the daemon writes them)."""
    counters = read_health(spool).get("shared", {}).get(queue, {}).get("claims", {})
    return counters if isinstance(counters, dict) else {}


def local_claims(spool: Path, queue: str = "jobs") -> set[str]:
    """The names `<spool>/<queue>/claims/` says this node holds now."""
    with contextlib.suppress(FileNotFoundError):
        return {p.name[: -len(".json")] for p in (spool / queue / "claims").iterdir() if p.name.endswith(".json")}
    return set()


# ---- proxies ------------------------------------------------------------------------------------------------------


class HttpProxy:
    """Forwards HTTP/1.1 requests on 127.0.0.1:`port` to `target` (http://host:port), one upstream request each.

    `strip`: request headers (lower case) never forwarded, e.g. {"if-none-match", "if-match"} for a store that
    ignores conditional writes. `before(method, key)` runs before a request is forwarded (`key` unquoted, without
    the bucket and query). `requests` counts what was forwarded by method.
    """

    def __init__(self, target: str, *, strip: Iterable[str] = (),
                 before: Callable[[str, str, str], None] | None = None) -> None:  # fmt: skip
        parts = urlsplit(target)
        self.target_host, self.target_port = parts.hostname or "127.0.0.1", parts.port or 80
        self.strip = frozenset(h.lower() for h in strip)
        self.before = before
        self.lock = threading.Lock()
        self.requests: dict[str, int] = {}
        self.stripped = 0
        handler = type("Handler", (_ProxyHandler,), {"proxy": self})
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port: int = self.server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    @property
    def total(self) -> int:
        with self.lock:
            return sum(self.requests.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request (a daemon stopped or killed) is no error of the proxy's."""


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    proxy: HttpProxy

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        proxy = self.proxy
        body = self._body()
        headers = {}
        for name, value in self.headers.items():
            lower = name.lower()
            if lower in proxy.strip:
                with proxy.lock:
                    proxy.stripped += 1
                continue
            if lower not in HOP_BY_HOP:
                headers[name] = value
        if self.command not in ("GET", "HEAD", "DELETE") or body:
            headers["Content-Length"] = str(len(body))
        with proxy.lock:
            proxy.requests[self.command] = proxy.requests.get(self.command, 0) + 1
        path, _, query = self.path.partition("?")
        if proxy.before is not None:
            bucket, _, key = unquote(path).lstrip("/").partition("/")
            proxy.before(self.command, bucket, key if not query else f"{key}?{query}")
        upstream = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body if body else None, headers=headers)
            reply = upstream.getresponse()
            data = reply.read()
        except OSError as exc:
            self.send_error(502, f"upstream: {exc}")
            return
        finally:
            upstream.close()
        self.send_response_only(reply.status, reply.reason)
        for name, value in reply.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        length = reply.getheader("Content-Length") if self.command == "HEAD" else str(len(data))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


class _Blackhole(set[int]):
    """netproxy's `wedged` set, which also swallows every connection accepted while `is_down`."""

    is_down = False

    def __contains__(self, number: object) -> bool:
        if self.is_down and isinstance(number, int):
            self.add(number)
            return True
        return super().__contains__(number)


class Partition:
    """A tests/netproxy.py `Proxy` in front of `target` (http://host:port) that a test can partition."""

    def __init__(self, target: str) -> None:
        parts = urlsplit(target)
        self.proxy = Proxy(parts.port or 80, target_host=parts.hostname or "127.0.0.1")
        self._holes = _Blackhole()
        self.proxy.wedged = self._holes
        self.endpoint = f"http://127.0.0.1:{self.proxy.port}"

    def down(self) -> None:
        """Nothing gets through from now on: open connections are wedged, new ones accepted and wedged."""
        self._holes.is_down = True
        self.proxy.wedge()

    def heal(self) -> None:
        """New connections are forwarded again; the wedged ones are cut, as a link that came back resets them."""
        self._holes.is_down = False
        self.proxy.cut()

    def close(self) -> None:
        self._holes.is_down = False
        self.proxy.close()


# ---- moto's request log -------------------------------------------------------------------------------------------

# werkzeug: 127.0.0.1 - - [01/Dec/2026 17:52:07] "PUT /bucket/key HTTP/1.1" 200 -   (4xx/5xx lines are coloured)
_REQUEST = re.compile(r'"(?:\x1b\[[\d;]*m)*([A-Z]+) (\S+) HTTP/1\.[01](?:\x1b\[[\d;]*m)*" (\d{3})')


@dataclass(frozen=True)
class Request:
    method: str
    key: str  # unquoted, without the bucket; "" for a bucket-level request (a listing)
    query: str
    status: int


def moto_requests(log: Path, bucket: str) -> list[Request]:
    """Every request moto logged for `bucket` (path-style URLs, as boto3 uses against 127.0.0.1)."""
    found = []
    for match in _REQUEST.finditer(log.read_text(errors="replace") if log.exists() else ""):
        method, target, status = match.groups()
        path, _, query = target.partition("?")
        name, _, key = path.lstrip("/").partition("/")
        if name == bucket:
            found.append(Request(method, unquote(key), query, int(status)))
    return found


def writes_by_key(requests: Iterable[Request], under: str) -> dict[str, int]:
    """Successful object writes (PUT or copy, a multipart completion) per key starting with `under`."""
    counts: dict[str, int] = {}
    for request in requests:
        is_write = (request.method == "PUT" and "partNumber=" not in request.query) or (
            request.method == "POST" and "uploadId=" in request.query)  # fmt: skip
        if is_write and request.status < 300 and request.key.startswith(under):
            counts[request.key] = counts.get(request.key, 0) + 1
    return counts
