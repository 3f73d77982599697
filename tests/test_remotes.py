"""`remotes:`: connection settings named once and used by every URL whose host is the remote's name."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import Config, parse_config
from spoold.daemon.remotes import RemoteSpec, resolve_step_options
from spoold.errors import ConfigError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.exec import Exec, ExecOptions
from spoold.handlers.wait import Wait, WaitOptions
from spoold.options import Builder
from tests.conftest import sidecar_state, wait_for
from tests.sshd import Sshd

EX_CONFIG = 78

REMOTES = """\
remotes:
  edge: {url: 'sftp://dorobot@edge.lan:22', identity: /etc/spoold/edge_key, known_hosts: /etc/spoold/known_hosts}
  gpu: {url: 'ssh://root@gpu.example', identity: /etc/spoold/gpu_key, connect_timeout: 5s}
  store: {url: 's3://rig-raw', endpoint_url: 'http://minio.lan:9000', region: eu-west-1, credential: s3key}
"""


def parse(chain: str, remotes: str = REMOTES) -> Config:
    """A config of `remotes` and one queue `q` with `chain` (YAML list items, dedented)."""
    body = textwrap.indent(textwrap.dedent(chain).strip("\n"), "      ")
    return parse_config(f"{remotes}spool: /tmp/unused\nqueues:\n  q:\n    chain:\n{body}\n", "spoold.yaml")


def options(config: Config, index: int = 0) -> Any:
    return config.queues["q"].steps[index].handler.options


def config_error(chain: str, remotes: str = REMOTES) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(chain, remotes)
    return caught.value


def remotes_of(text: str = REMOTES) -> dict[str, RemoteSpec]:
    return parse("- checksum: {}", text).remotes


def test_ship_url_naming_a_remote_gets_its_host_and_settings() -> None:
    ship = options(parse("- ship: {to: 'sftp://edge/var/spool/spoold/episodes/inbox/'}"))
    assert ship.to == "sftp://dorobot@edge.lan:22/var/spool/spoold/episodes/inbox/"
    assert ship.identity == "/etc/spoold/edge_key"
    assert ship.known_hosts == "/etc/spoold/known_hosts"


def test_s3_url_naming_a_remote_gets_its_bucket_and_endpoint() -> None:
    ship = options(parse("- ship: {to: 's3://store/raw-chapters/{session}/{name}'}"))
    assert ship.to == "s3://rig-raw/raw-chapters/{session}/{name}"
    assert (ship.endpoint_url, ship.region, ship.credential) == ("http://minio.lan:9000", "eu-west-1", "s3key")


def test_wait_and_pull_urls_use_remotes_and_sftp_shares_ssh_remotes() -> None:
    config = parse("""\
        - wait: {sidecar: 'sftp://edge/var/spool/spoold/episodes/status/{name}.json', import: [model_dir]}
        - wait: {path: 'sftp://gpu/{model_dir}/checkpoints/*/pretrained_model'}
        - pull: {from: 'sftp://gpu/{model_dir}/checkpoints/last/', to: 'file:///tmp/models/'}
        """)
    sidecar, path, pull = options(config, 0), options(config, 1), options(config, 2)
    assert sidecar.sidecar == "sftp://dorobot@edge.lan:22/var/spool/spoold/episodes/status/{name}.json"
    assert sidecar.identity == "/etc/spoold/edge_key"
    # An ssh:// remote serves sftp:// URLs: both are one SSH login.
    assert path.path == "sftp://root@gpu.example/{model_dir}/checkpoints/*/pretrained_model"
    assert (path.identity, path.connect_timeout, path.known_hosts) == ("/etc/spoold/gpu_key", 5, None)
    assert pull.from_ == "sftp://root@gpu.example/{model_dir}/checkpoints/last/"
    assert pull.identity == "/etc/spoold/gpu_key"
    assert pull.to == "file:///tmp/models/"


def test_the_steps_own_options_override_the_remotes() -> None:
    ship = options(parse("- ship: {to: 'sftp://edge/inbox/', identity: /mine, host_key: tofu}"))
    assert ship.to == "sftp://dorobot@edge.lan:22/inbox/"
    assert (ship.identity, ship.host_key, ship.known_hosts) == ("/mine", "tofu", "/etc/spoold/known_hosts")


@pytest.mark.parametrize("url", [
    "sftp://edge.lan/inbox/",          # no remote has this name: an ordinary host
    "sftp://other@edge/inbox/",        # its own user: the URL says everything itself
    "sftp://edge:2222/inbox/",         # its own port
    "sftp://{host}/inbox/",            # a templated host is never a remote
    "sftp://edge{n}/inbox/",
    "file://edge/inbox/",              # file:// has no host
])  # fmt: skip
def test_urls_that_name_no_remote_are_untouched(url: str) -> None:
    ship = options(parse(f"- ship: {{to: '{url}'}}"))
    assert ship.to == url
    assert ship.identity is None and ship.known_hosts is None


def test_the_path_is_kept_exactly_as_written() -> None:
    ship = options(parse("- ship: {to: 'sftp://edge/a%2Fb/%41 x?#/{name}'}"))
    assert ship.to == "sftp://dorobot@edge.lan:22/a%2Fb/%41 x?#/{name}"


def test_a_shorthand_step_is_resolved_too() -> None:
    ship = options(parse("- ship: 'sftp://edge/inbox/'"))
    assert ship.to == "sftp://dorobot@edge.lan:22/inbox/" and ship.identity == "/etc/spoold/edge_key"


def test_http_urls_are_never_remotes() -> None:
    raw = {"sidecar": "http://edge/status/{name}.json", "interval": "1s"}
    resolved = resolve_step_options(Builder(), remotes_of(), Wait, raw, ("q",))
    assert resolved == raw


def test_each_any_entry_is_resolved_with_its_own_settings() -> None:
    raw = {"any": [
        {"url": "http://cloud.example:8000/transactions/{transaction_id}", "json": {"status": "COMPLETED"}},
        {"path": "sftp://gpu/{model_dir}/pretrained_model", "settle": "30s", "identity": "/entry_key"},
        {"sidecar": "sftp://edge/status/{name}.json"},
    ], "interval": "60s"}  # fmt: skip
    resolved = resolve_step_options(Builder(), remotes_of(), Wait, raw, ("q",))
    assert isinstance(resolved, dict)
    http, path, sidecar = resolved["any"]
    assert http == raw["any"][0]
    assert path == {"path": "sftp://root@gpu.example/{model_dir}/pretrained_model", "settle": "30s",
                    "identity": "/entry_key", "connect_timeout": 5}  # fmt: skip
    assert sidecar == {"sidecar": "sftp://dorobot@edge.lan:22/status/{name}.json",
                       "identity": "/etc/spoold/edge_key", "known_hosts": "/etc/spoold/known_hosts"}  # fmt: skip
    # Settings go into each entry, not onto the wait step itself.
    assert set(resolved) == {"any", "interval"}


WAIT_HAS_ANY = "any" in {f.name for f in dataclasses.fields(WaitOptions)}


@pytest.mark.skipif(not WAIT_HAS_ANY, reason="wait's `any:` has not landed yet")
def test_wait_any_entries_through_the_config() -> None:
    wait = options(
        parse("""\
        - wait:
            any:
              - {url: 'http://cloud.example:8000/t/{transaction_id}', json: {status: COMPLETED}}
              - {path: 'sftp://gpu/{model_dir}/pretrained_model'}
            interval: 60s
        """)
    )
    entry = wait.any[1]
    assert entry.path == "sftp://root@gpu.example/{model_dir}/pretrained_model"
    assert entry.identity == "/etc/spoold/gpu_key"


def test_exec_bare_remote_name_becomes_its_ssh_url() -> None:
    remotes = {"gpu": RemoteSpec(url="ssh://root@gpu.example:2222"), "edge": RemoteSpec(url="sftp://edge.lan")}
    cases = [("gpu", "ssh://root@gpu.example:2222"), ("edge", "ssh://edge.lan"),
             ("ssh://gpu", "ssh://root@gpu.example:2222"), ("ssh://me@gpu", "ssh://me@gpu")]  # fmt: skip
    for given, expected in cases:
        raw = {"argv": ["/bin/true"], "remote": given}
        assert resolve_step_options(Builder(), remotes, Exec, raw, ("q",)) == {**raw, "remote": expected}


EXEC_HAS_REMOTE = "remote" in {f.name for f in dataclasses.fields(ExecOptions)}


@pytest.mark.skipif(not EXEC_HAS_REMOTE, reason="exec's `remote:` has not landed yet")
def test_exec_remote_through_the_config() -> None:
    step = options(parse("- exec: {argv: [/usr/local/bin/train, '{name}'], remote: gpu}"))
    assert step.remote == "ssh://root@gpu.example"
    assert step.identity == "/etc/spoold/gpu_key"


@pytest.mark.parametrize(("remotes", "words"), [
    (REMOTES, "no remote named 'gpu2'; remotes: edge, gpu, store"),
    ("", "no remote named 'gpu2' (no remotes: section)"),
])  # fmt: skip
def test_exec_unknown_bare_remote_name_is_a_config_error(remotes: str, words: str) -> None:
    error = config_error(
        """\
        - checksum: {}
        - exec: {argv: [/bin/true], remote: gpu2}
        """,
        remotes,
    )
    assert words in error.message
    assert error.path == "queues.q.chain[1].exec.remote"
    assert error.line == REMOTES.count("\n") * bool(remotes) + 6


def test_exec_bare_name_of_an_s3_remote_is_a_config_error() -> None:
    error = config_error("- exec: {argv: [/bin/true], remote: store}")
    assert "store" in error.message and "SSH" in error.message


@pytest.mark.parametrize(("url", "remote_url"), [("s3://edge/raw/", "sftp://dorobot@edge.lan:22"),
                                                  ("sftp://store/raw/", "s3://rig-raw")])  # fmt: skip
def test_a_url_whose_scheme_does_not_fit_its_remote_is_a_config_error(url: str, remote_url: str) -> None:
    error = config_error(f"- ship: {{to: '{url}'}}")
    assert f"'{url}' cannot use remote" in error.message and f"'{remote_url}'" in error.message
    assert "do not mix" in error.message
    assert error.path == "queues.q.chain[0].ship.to"
    assert error.line == 9


def test_two_remotes_with_different_settings_in_one_step_is_a_config_error() -> None:
    raw = {"path": "sftp://edge/a", "sidecar": "sftp://gpu/b"}
    with pytest.raises(ConfigError, match="remotes 'edge' and 'gpu' set different identity"):
        resolve_step_options(Builder(), remotes_of(), Wait, raw, ("q",))


@dataclasses.dataclass(frozen=True)
class ToOnly:
    to: str


class Narrow(Handler[ToOnly]):
    """A handler that takes a URL but no connection options."""

    name = "narrow"
    Options = ToOnly
    url_options = ("to",)

    def run(self, ctx: StepContext) -> StepResult:
        return StepResult()


def test_a_remote_setting_the_handler_does_not_take_is_a_config_error() -> None:
    remotes = {"store": RemoteSpec(url="s3://rig-raw", endpoint_url="http://minio.lan:9000")}
    with pytest.raises(ConfigError, match="remote 'store' sets endpoint_url, which narrow does not take"):
        resolve_step_options(Builder(), remotes, Narrow, {"to": "s3://store/x"}, ("q",))
    # A remote with no settings adds none, so such a handler can still use it by name.
    bare = {"plain": RemoteSpec(url="s3://plain-bucket")}
    assert resolve_step_options(Builder(), bare, Narrow, {"to": "s3://plain/x"}, ("q",)) == {
        "to": "s3://plain-bucket/x"
    }


# (remote's YAML, YAML path, words): every one on line 2 of the config.
BAD_REMOTES = [
    ("{url: 'sftp://h', idenity: /k}", "remotes.r.idenity", "did you mean 'identity'"),
    ("{url: 'sftp://h', host_key: maybe}", "remotes.r.host_key", "expected one of 'strict', 'tofu'"),
    ("{url: 'sftp://h', connect_timeout: soon}", "remotes.r.connect_timeout", "duration"),
    ("{url: 'sftp://h/var/spool'}", "remotes.r", "names a host only"),
    ("{url: 'sftp://me:hunter2@h'}", "remotes.r", "never put a password"),
    ("{url: 'ftp://h'}", "remotes.r", "must be sftp://"),
    ("{url: 'h'}", "remotes.r", "must be sftp://"),
    ("{url: 'sftp://{host}'}", "remotes.r", "template"),
    ("{url: 'sftp://h:port'}", "remotes.r", "bad port"),
    ("{url: 's3://me@bucket'}", "remotes.r", "bucket only"),
    ("{url: 's3://bucket', identity: /k}", "remotes.r", "identity: not used by s3:// remotes"),
    ("{url: 'sftp://h', region: eu-west-1}", "remotes.r", "region: not used by sftp:// remotes"),
    ("{url: 's3://bucket', endpoint_url: 'minio:9000'}", "remotes.r", "http:// or https://"),
    ("{identity: /k}", "remotes.r", "missing required key 'url'"),
    ("[sftp://h]", "remotes.r", "expected a mapping"),
]


@pytest.mark.parametrize(("remote", "yaml_path", "words"), BAD_REMOTES, ids=[b[2] for b in BAD_REMOTES])
def test_bad_remote_settings_are_config_errors_with_their_line(remote: str, yaml_path: str, words: str) -> None:
    error = config_error("- checksum: {}", f"remotes:\n  r: {remote}\n")
    assert words in error.message
    assert (error.file, error.path, error.line) == ("spoold.yaml", yaml_path, 2)
    assert "hunter2" not in str(error)


def test_a_bad_remote_name_is_a_config_error() -> None:
    error = config_error("- checksum: {}", "remotes:\n  ok: {url: 'sftp://h'}\n  'bad name': {url: 'sftp://h'}\n")
    assert "remote name 'bad name'" in error.message and error.line == 3


def test_check_exits_78_with_one_line_on_a_bad_remote(tmp_path: Path) -> None:
    path = tmp_path / "spoold.yaml"
    path.write_text(f"spool: {tmp_path}/spool\nremotes:\n  edge:\n    url: 'sftp://edge.lan'\n    host_key: maybe\n"
                    "queues:\n  q: {chain: [checksum]}\n")  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(path)], capture_output=True,
                            text=True, timeout=30, cwd=tmp_path)  # fmt: skip
    assert result.returncode == EX_CONFIG, result
    assert result.stdout == "" and "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.endswith(f"{path}:5: remotes.edge.host_key: expected one of 'strict', 'tofu', got 'maybe'"), line


def test_ship_and_wait_over_real_sftp_by_remote_name(
    sshd: Sshd, tmp_path: Path, spool: Path, daemon: Any, write_config: Callable[..., Path]
) -> None:
    dest = tmp_path / "remote" / "inbox"
    dest.mkdir(parents=True)
    remote = {"url": sshd.url(""), "identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)}
    config = write_config(f"""
        spool: {{spool}}
        remotes:
          box: {json.dumps(remote)}
        queues:
          files:
            settle: 0.2s
            retry: {{attempts: 2, delays: [0s]}}
            chain:
              - checksum: {{}}
              - ship: {{to: 'sftp://box{dest}/'}}
              - wait: {{path: 'sftp://box{dest}/{{name}}', interval: 0.2s, timeout: 30s}}
        """)
    daemon(config)
    payload = os.urandom(100_000)
    inbox = spool / "files" / "inbox"
    (inbox / ".clip.bin.tmp").write_bytes(payload)
    os.rename(inbox / ".clip.bin.tmp", inbox / "clip.bin")
    doc = wait_for(sidecar_state(spool, "files", "clip.bin", "done"), 30, "shipped over the remote")
    assert (dest / "clip.bin").read_bytes() == payload
    ship = next(s for s in doc["steps"] if s["name"] == "ship")
    assert ship["result"]["verified"] is True
    assert ship["result"]["to"] == sshd.url(f"{dest}/")
    assert doc["fields"]["found"] == str(dest / "clip.bin")
