"""wait's `settle`, `url` and `any` (issue 12): real trees on disk and over a real sshd, a real HTTP server on
loopback, the daemon itself for the field note 000 shape; config errors through the real config loader."""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import parse_config
from spoold.errors import ConfigError, Interrupted, PermanentError
from spoold.handlers.base import StepResult
from spoold.handlers.wait import Wait
from spoold.templates import is_url_template, render, render_url
from spoold.transports import TransportPool
from spoold.transports.base import CONNECTION_KEYS
from spoold.transports.local import LocalTransport
from tests.conftest import read_sidecar, sidecar_state, wait_for
from tests.sshd import Sshd


def wait_step(options: dict[str, Any]) -> Wait:
    """A wait step built by the real config loader from `options`."""
    text = json.dumps({"spool": "/nonexistent", "queues": {"q": {"items": "requests", "chain": [{"wait": options}]}}})
    handler = parse_config(text, "test.yaml").queues["q"].steps[0].handler
    assert isinstance(handler, Wait)
    return handler


class Checkpoint:
    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.saves = 0

    def save(self) -> None:
        self.saves += 1


class StepHarness:
    """The daemon's side of a step (`handlers.base.StepContext`) for one item, with real transports."""

    def __init__(self, tmp_path: Path, fields: dict[str, Any] | None = None) -> None:
        self.queue, self.item, self.kind = "q", "item", "request"
        self.item_dir = tmp_path / "work"
        self.payload: list[Path] = []
        self.extras: list[Path] = []
        self.fields = dict(fields or {})
        self.digests: dict[str, dict[str, str]] = {}
        self.checkpoint = Checkpoint()
        self.min_free_bytes = 0
        self.log = logging.LoggerAdapter(logging.getLogger("spoold.wait"), {"item": self.item})
        self.arriving = None
        self.messages: list[str] = []
        self.stop = threading.Event()
        self.pool = TransportPool()

    def template_values(self) -> dict[str, Any]:
        return {**self.fields, "name": self.item, "queue": self.queue}

    def render(self, template: str) -> str:
        values = self.template_values()
        return render_url(template, values) if is_url_template(template) else render(template, values)

    def progress(self, done: int, total: int, **extra: Any) -> None:
        pass

    def waiting(self, message: str, next_check_in_seconds: float) -> None:
        self.messages.append(message)

    def sleep(self, seconds: float) -> None:
        if self.stop.wait(max(seconds, 0.0)):
            raise Interrupted("stopping")

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("stopping")

    def transport(self, url: str, settings: Any) -> Any:
        return self.pool.get(url, settings)

    def hand_over(self, queue: str, paths: list[Path], fields: Any, name: str | None = None) -> str:
        raise AssertionError("wait never hands over")

    def free_bytes(self) -> int:
        return 1 << 40

    def said(self, text: str) -> Callable[[], bool]:
        return lambda: any(text in m for m in self.messages[-3:])


class Running:
    """A step run on a thread, so the test can change the world while it polls."""

    def __init__(self, step: Wait, ctx: StepHarness) -> None:
        self.ctx = ctx
        self.result: StepResult | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(step,), daemon=True)
        self.thread.start()

    def _run(self, step: Wait) -> None:
        try:
            self.result = step.run(self.ctx)  # type: ignore[arg-type]
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 15) -> StepResult:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the wait did not end; last said: {self.ctx.messages[-1:]}"
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def stop(self) -> None:
        self.ctx.stop.set()
        self.thread.join(10)
        self.ctx.pool.close()


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[StepHarness]:
    ctx = StepHarness(tmp_path, {"tx": "t-42"})
    yield ctx
    ctx.stop.set()
    ctx.pool.close()


# -- a status server ------------------------------------------------------------------------------


class StatusServer(http.server.ThreadingHTTPServer):
    """Answers every GET as `mode` says: a JSON status, a 5xx, a hang, a body that is not a JSON object."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StatusHandler)
        self.mode = "TRAINING"
        self.extra: dict[str, Any] = {}
        self.release = threading.Event()
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.server_address[1]}{path}"

    def close(self) -> None:
        self.release.set()
        self.shutdown()
        self.server_close()


class StatusHandler(http.server.BaseHTTPRequestHandler):
    server: StatusServer

    def do_GET(self) -> None:
        self.server.paths.append(self.path)
        mode = self.server.mode
        if mode == "hang":
            self.server.release.wait(10)  # past the client's timeout; released at teardown
            return
        status, body = {
            "500": (500, b"oops"),
            "404": (404, b"no such transaction"),
            "403": (403, b"forbidden"),
            "410": (410, b"gone"),
            "notjson": (200, b"<html>proxy error</html>"),
            "list": (200, b"[1, 2, 3]"),
        }.get(mode, (200, json.dumps({"status": mode, "progress": {"done": mode == "COMPLETED"}, **self.server.extra})
                     .encode()))  # fmt: skip
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def status_server() -> Iterator[StatusServer]:
    server = StatusServer()
    yield server
    server.close()


def url_condition(server: StatusServer, **extra: Any) -> dict[str, Any]:
    return {"url": server.url("/transactions/{tx}"), "json": {"status": "COMPLETED", "progress.done": True},
            "fail_on": {"status": ["FAILED", "CANCELLED"]}, **extra}  # fmt: skip


# -- settle -----------------------------------------------------------------------------------------


class TreeWriter:
    """Grows a file deep inside `root` every `pace` seconds for `seconds`: the folder's own mtime never moves."""

    def __init__(self, root: Path, seconds: float, pace: float = 0.05) -> None:
        self.deep = root / "sub" / "deeper" / "weights.bin"
        self.deep.parent.mkdir(parents=True)
        self.deep.write_bytes(b"w")
        self.seconds, self.pace = seconds, pace
        self.last_change = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        end = time.monotonic() + self.seconds
        while time.monotonic() < end:
            with open(self.deep, "ab") as stream:
                stream.write(b"x" * 100)
            self.last_change = time.monotonic()
            self.done.wait(self.pace)  # pacing the writer, not synchronising the test
        self.done.set()


def test_settle_waits_until_a_changing_tree_stops(tmp_path: Path, harness: StepHarness) -> None:
    model = tmp_path / "runs" / "t-42" / "model"
    step = wait_step({"path": f"file://{tmp_path}/runs/{{tx}}/model", "settle": "0.6s", "interval": "0.2s"})
    writer = TreeWriter(model, seconds=1.5)
    result = step.run(harness)  # type: ignore[arg-type]
    quiet = time.monotonic() - writer.last_change
    assert writer.done.is_set(), "the wait ended while the tree was still changing"
    assert quiet >= 0.6 - 0.02, f"ended {quiet:.2f}s after the last change, before settle"
    assert result.fields["found"] == str(model)
    assert result.result["held"] == {"index": 0, "kind": "path", "url": f"file://{model}"}
    assert any("settling" in m for m in harness.messages)


def test_settle_over_sftp_settles_the_newest_match(sshd: Sshd, tmp_path: Path, harness: StepHarness) -> None:
    runs = tmp_path / "remote" / "runs"
    (runs / "old" / "model").mkdir(parents=True)
    (runs / "old" / "model" / "w.bin").write_bytes(b"old")
    os.utime(runs / "old" / "model", (1_000_000_000, 1_000_000_000))
    writer = TreeWriter(runs / "new" / "model", seconds=1.2)
    step = wait_step({"path": sshd.url(f"{runs}/*/model"), "settle": "0.8s", "interval": "0.2s",
                      "identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)})  # fmt: skip
    result = step.run(harness)  # type: ignore[arg-type]
    assert writer.done.is_set() and time.monotonic() - writer.last_change >= 0.8 - 0.02
    assert result.fields["found"] == str(runs / "new" / "model")
    assert result.result["held"]["kind"] == "path" and result.result["settled_s"] >= 0.78
    transport = harness.pool.get(sshd.url("/"), step.options.connection_settings())
    below = ("", "model", "model/sub", "model/sub/deeper", "model/sub/deeper/weights.bin")
    assert [e.path for e in transport.tree(str(runs / "new"))] == [str(runs / "new" / p) if p else str(runs / "new")
                                                                    for p in below]  # fmt: skip
    assert transport.tree(str(runs / "missing")) == []


def test_local_tree_lists_links_without_following_them(tmp_path: Path) -> None:
    (tmp_path / "elsewhere" / "big").mkdir(parents=True)
    (tmp_path / "elsewhere" / "big" / "secret.bin").write_bytes(b"s")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "elsewhere")
    transport = LocalTransport(None, {})  # type: ignore[arg-type]
    listed = transport.tree(str(tmp_path / "root"))
    assert [(e.path, e.is_dir) for e in listed] == [(str(tmp_path / "root"), True),
                                                     (str(tmp_path / "root" / "link"), False)]  # fmt: skip
    assert transport.tree(str(tmp_path / "nothing")) == []


# -- url --------------------------------------------------------------------------------------------


def test_url_completed_ends_the_wait_with_imports(status_server: StatusServer, harness: StepHarness) -> None:
    step = wait_step({**url_condition(status_server, **{"import": ["model_dir"]}), "interval": "0.2s"})
    run = Running(step, harness)
    try:
        wait_for(harness.said('status="TRAINING"'), 10, "the training status in the waiting message")
        status_server.extra = {"model_dir": "/models/42"}
        status_server.mode = "COMPLETED"
        result = run.join()
    finally:
        run.stop()
    assert result.fields == {"model_dir": "/models/42"}
    assert result.result["held"] == {"index": 0, "kind": "url", "url": status_server.url("/transactions/t-42")}
    assert result.result["status"] == {"status": "COMPLETED", "progress.done": True}
    assert status_server.paths[-1] == "/transactions/t-42"


def test_url_failed_fails_at_once_without_secrets(status_server: StatusServer, harness: StepHarness) -> None:
    status_server.mode = "FAILED"
    url = status_server.url("/transactions/{tx}?token=s3cr3t-tok", userinfo="robot:hunter22@")
    step = wait_step({**url_condition(status_server), "url": url, "interval": "30s", "timeout": "1h"})
    started = time.monotonic()
    with pytest.raises(PermanentError) as failure:
        step.run(harness)  # type: ignore[arg-type]
    assert time.monotonic() - started < 10, "a fail_on match must not wait for the next poll or the timeout"
    message = str(failure.value)
    assert "status" in message and '"FAILED"' in message and "fail_on" in message
    assert "hunter22" not in message and "s3cr3t-tok" not in message and "robot" not in message


@pytest.mark.parametrize("mode", ["403", "410"])
def test_url_client_error_is_permanent(mode: str, status_server: StatusServer, harness: StepHarness) -> None:
    status_server.mode = mode
    with pytest.raises(PermanentError, match=f"HTTP {mode}"):
        wait_step({**url_condition(status_server), "interval": "30s"}).run(harness)  # type: ignore[arg-type]


def test_url_problems_keep_it_polling_until_it_recovers(status_server: StatusServer, harness: StepHarness) -> None:
    step = wait_step({**url_condition(status_server), "interval": "0.2s", "connect_timeout": "0.5s"})
    run = Running(step, harness)
    try:
        for mode, problem in (("500", "HTTP 500"), ("hang", "timed out"), ("notjson", "not JSON"),
                              ("list", "not an object"), ("404", "HTTP 404 so far")):  # fmt: skip
            status_server.mode = mode
            wait_for(harness.said(problem), 10, f"{problem!r} in the waiting message")
            assert run.thread.is_alive(), f"the wait ended on {mode}"
        assert any("last poll failed: GET http://127.0.0.1" in m for m in harness.messages)
        status_server.mode = "COMPLETED"
        result = run.join()
    finally:
        run.stop()
    assert result.result["held"]["kind"] == "url"


def test_url_timeout_names_the_last_problem(status_server: StatusServer, harness: StepHarness) -> None:
    status_server.mode = "500"
    step = wait_step({**url_condition(status_server), "interval": "0.2s", "timeout": "1s"})
    with pytest.raises(PermanentError) as failure:
        step.run(harness)  # type: ignore[arg-type]
    assert "timed out after 1s" in str(failure.value) and "last poll failed" in str(failure.value)
    assert "HTTP 500" in str(failure.value)
    assert len(status_server.paths) >= 3, "it must go on polling until the timeout"


# -- any ---------------------------------------------------------------------------------------------


def test_any_path_holds_while_the_api_never_completes(
    tmp_path: Path, spool: Path, daemon: Any, write_config: Any, status_server: StatusServer
) -> None:
    status_server.mode = "500"  # the API is down all along: the path is looked at all the same
    model = tmp_path / "gpu" / "train" / "act_t-42" / "pretrained_model"
    chain = [{"wait": {"any": [url_condition(status_server, connect_timeout="1s"),
                               {"path": f"file://{tmp_path}/gpu/train/act_{{tx}}/pretrained_model", "settle": "0.3s"}],
                       "interval": "0.2s", "timeout": "60s"}}]  # fmt: skip
    daemon(write_config(json.dumps({"spool": "{spool}", "queues": {
        "episodes": {"items": "requests", "settle": "0s", "chain": chain}}})))  # fmt: skip
    inbox = spool / "episodes" / "inbox"
    (inbox / ".e1.json.tmp").write_text(json.dumps({"tx": "t-42"}))
    os.rename(inbox / ".e1.json.tmp", inbox / "e1.json")

    def failing_and_waiting() -> dict[str, Any] | None:
        doc = read_sidecar(spool, "episodes", "e1")
        said = doc["steps"][0].get("waiting", {}).get("for", "") if doc and doc.get("state") == "waiting" else ""
        return doc if "any of:" in said and "HTTP 500" in said else None

    doc = wait_for(failing_and_waiting, 30, "waiting on both, the API failing")
    assert "pretrained_model to exist and stay unchanged for 0.3s" in doc["steps"][0]["waiting"]["for"]
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    done = wait_for(sidecar_state(spool, "episodes", "e1", "done"), 30, "done")
    result = done["steps"][0]["result"]
    assert result["held"] == {"index": 1, "kind": "path", "url": f"file://{model}"}
    assert done["fields"]["found"] == str(model) and result["waited_s"] > 0


def test_any_entry_connection_options_default_to_the_step() -> None:
    step = wait_step({"any": [{"path": "sftp://gpu.example/a", "identity": "/own_key"},
                              {"sidecar": "sftp://edge.example/s.json", "host_key": "tofu"}],
                      "identity": "/step_key", "known_hosts": "/kh", "connect_timeout": "5s"})  # fmt: skip
    (_, first), (_, second) = step.options.conditions()
    assert set(first) == set(CONNECTION_KEYS) == set(second)
    assert (first["identity"], first["known_hosts"], first["host_key"]) == ("/own_key", "/kh", "strict")
    assert (second["identity"], second["host_key"], second["connect_timeout"]) == ("/step_key", "tofu", 5.0)


@pytest.mark.parametrize(("options", "where", "says"), [
    ({"any": [{"path": "file:///a", "setle": "1s"}]}, "wait.any[0].setle", "did you mean 'settle'"),
    ({"any": [{"path": "file:///a"}, {"path": "file:///b", "url": "http://h/s", "json": {"a": 1}}]},
     "wait.any[1]", "got path and url"),
    ({"any": [{"path": "file:///a"}], "path": "file:///b"}, "wait", "path cannot stand beside any"),
    ({"any": []}, "wait", "any needs at least one condition"),
    ({"url": "http://h/s"}, "wait", "url needs json"),
    ({"url": "http://h/s", "json": {"status": "OK"}, "import": ["name"]}, "wait", "import name would shadow"),
    ({"url": "http://h/s", "json": {"status": "OK"}, "import": ["a.b"]}, "wait", "no dots"),
    ({"path": "file:///a", "fail_on": {"status": "X"}}, "wait", "fail_on works only with url"),
    ({"any": [{"url": "http://h/s", "json": {"status": {"deep": 1}}}]}, "wait.any[0]", "dotted key"),
])  # fmt: skip
def test_config_errors_name_the_entry(options: dict[str, Any], where: str, says: str) -> None:
    with pytest.raises(ConfigError) as failure:
        wait_step(options)
    assert failure.value.path == f"queues.q.chain[0].{where}" and says in failure.value.message
