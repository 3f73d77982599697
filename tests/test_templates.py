"""Templates with untrusted values: built-ins win, URLs and paths cannot escape, argv gains no options."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from spoold.daemon.context import ItemContext, ItemEnv
from spoold.errors import PermanentError, TemplateError
from spoold.handlers.exec import ExecOptions, captured_fields
from spoold.templates import (
    BUILTIN_NAMES,
    render,
    render_arg,
    render_path,
    render_text,
    render_url,
    shadowed_builtins,
    template_fields,
)
from spoold.transports.base import check_name, format_url, join_name, parse_url

# Names a producer may choose (any bytes but `/` and NUL): each must land as itself, or be refused.
HOSTILE_NAMES = [
    "plain.mp4", "a#1", "a?1", "a%231", "a%3F1", "a b", "a%20b", "a+b", "a;rm -rf ~", "$(id)", "`id`", "a\nb",
    "a\rb", "a\tb", "-rf", "--help", "a%2e%2e%2fx", "a%2fb", "a%252fb", "..a", "a..", "...", "a\\b", "caf\u00e9",
    "caf\udcff", "caf\udce9", "\udcff\udcfe", "x" * 200, "'quoted'", '"dq"', "a&b=c", "~user", "*", "[ab]",
    "100%", "%", "%%", "%zz", "a:b", "a@b", "nul%00", "%00",
]  # fmt: skip
ESCAPING_VALUES = ["..", "../x", "a/../../b", "%2e%2e", "%2e%2e%2f", "%2e%2e%2fx", "%252e%252e%252f", "..%2f",
                   "%2E%2E/", "..\\x", "%2e%2e%5cx", "%25252e%25252e"]  # fmt: skip


def fake_context(fields: dict[str, Any], digests: dict[str, dict[str, str]], tmp_path: Path) -> ItemContext:
    """An ItemContext over stand-ins: `template_values` needs only names, folders and the sidecar document."""
    doc = {"kind": "file", "payload": ["clip.mp4"], "extras": [], "fields": fields, "digests": digests,
           "original_name": "clip.mp4"}  # fmt: skip
    sidecar = SimpleNamespace(doc=doc, name="clip.mp4", step_entry=lambda _index: {"name": "exec"})
    env = SimpleNamespace(
        config=SimpleNamespace(host="node1", min_free_bytes=0), queue=SimpleNamespace(name="q"),
        folders=SimpleNamespace(work=tmp_path / "work"), sidecar=sidecar, transports=None,
        stop_event=threading.Event(), report_state=lambda _state: None,
    )  # fmt: skip
    return ItemContext(cast(ItemEnv, env), 0, None)


def test_fields_cannot_override_builtins(tmp_path: Path) -> None:
    hostile = {name: "/etc/shadow" for name in BUILTIN_NAMES} | {"session": "s1"}
    ctx = fake_context(hostile, {"clip.mp4": {"sha256": "ab" * 32}}, tmp_path)
    values = ctx.template_values()
    item_dir = tmp_path / "work" / "clip.mp4"
    assert values["path"] == str(item_dir / "clip.mp4")
    assert values["item_dir"] == str(item_dir)
    assert values["name"] == values["item"] == values["original_name"] == "clip.mp4"
    assert (values["stem"], values["ext"], values["queue"], values["host"]) == ("clip", "mp4", "q", "node1")
    assert values["sha256"] == "ab" * 32
    assert values["session"] == "s1"
    # A digest that was never computed is not available at all, rather than the producer's value.
    for algorithm in ("md5", "xxh64", "xxh3_128"):
        assert algorithm not in values
    assert "/etc/shadow" not in values.values()
    assert ctx.render("{path}") == str(item_dir / "clip.mp4")
    with pytest.raises(TemplateError, match="needs field 'md5'"):
        ctx.render("{md5}")


def test_builtin_names_are_every_builtin(tmp_path: Path) -> None:
    digests = {"clip.mp4": {"sha256": "1", "xxh3_128": "2", "xxh64": "3", "md5": "4"}}
    ctx = fake_context({"session": "s1"}, digests, tmp_path)
    assert set(ctx.template_values()) - {"session"} == BUILTIN_NAMES
    # Digests of several files (a bundle) are not single values: fields of those names still never show.
    many = fake_context({"sha256": "forged"}, {"a": {"sha256": "1"}, "b": {"sha256": "2"}}, tmp_path)
    assert "sha256" not in many.template_values()


def test_shadowed_builtins() -> None:
    assert shadowed_builtins({}) == []
    assert shadowed_builtins({"session": 1, "camera_id": "L"}) == []
    fields = {"path": "/etc/shadow", "session": 1, "name": "x", "sha256": "f"}
    assert shadowed_builtins(fields) == ["name", "path", "sha256"]
    assert shadowed_builtins({"Path": 1, "path_": 2}) == []  # templates are case-sensitive


@pytest.mark.parametrize("base", ["file:///dest/", "sftp://spoold@cloud.example:22/srv/inbox/", "s3://bucket/raw/"])
def test_url_values_land_as_themselves_or_are_refused(base: str) -> None:
    scheme = parse_url(base).scheme
    folder = parse_url(base).path
    landed: dict[str, str] = {}
    for name in HOSTILE_NAMES:
        try:
            rendered = render_url(base + "{name}", {"name": name})
        except TemplateError as exc:
            assert str(exc), name
            is_ok = "\x00" in name.replace("%00", "\x00") or (scheme != "file" and not _is_utf8(name))
            assert is_ok, f"{name!r} was refused for {scheme}: {exc}"
            continue
        path = parse_url(rendered).path
        assert path == folder + name, (name, rendered, path)
        assert path.startswith(folder) and "/" not in path[len(folder) :]
        landed[name] = path
    assert len(set(landed.values())) == len(landed), "two different names map to one path"
    assert {"a#1", "a?1", "a%231", "a%3F1", "a%2e%2e%2fx", "--help"} <= set(landed)


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@pytest.mark.parametrize("value", ESCAPING_VALUES)
@pytest.mark.parametrize("template", ["file:///dest/{x}", "file:///dest/{x}/f", "sftp://h/srv/{x}/f",
                                      "s3://b/raw/{x}", "file://./spool/{x}"])  # fmt: skip
def test_url_values_that_decode_to_dotdot_are_refused(template: str, value: str) -> None:
    with pytest.raises(TemplateError, match="escape"):
        render_url(template, {"x": value})


@pytest.mark.parametrize("value", ["a\x00b", "\x00", "%00", "a%2500b"])
def test_nul_is_refused_everywhere(tmp_path: Path, value: str) -> None:
    with pytest.raises(TemplateError, match="NUL"):
        render_url("file:///dest/{x}", {"x": value})
    if "\x00" in value:
        for render_one in (lambda: render_arg("{x}", {"x": value}), lambda: render_text("{x}", {"x": value}),
                           lambda: render_path("{x}.json", {"x": value}, tmp_path),
                           lambda: render("/b/{x}", {"x": value})):  # fmt: skip
            with pytest.raises(TemplateError, match="NUL"):
                render_one()


def test_url_values_with_slashes() -> None:
    # A value may be a relative or absolute folder (wait's `found`, a far sidecar's `model_dir`)...
    assert parse_url(render_url("sftp://gpu/{model_dir}/train/x", {"model_dir": "/root/models"})).path == (
        "//root/models/train/x"
    )
    assert parse_url(render_url("s3://b/raw/{session}/{name}", {"session": "2024/s1", "name": "a#b"})).path == (
        "/raw/2024/s1/a#b"
    )
    # ... but never one that walks: `.`, `..` in any form, anywhere in it.
    for value in ("a/./b", "./a", "a/.", "a/../b", "a/%2e%2e/b", "a/%2e/b"):
        with pytest.raises(TemplateError):
            render_url("s3://b/raw/{session}/x", {"session": value})
    with pytest.raises(TemplateError):
        render_url("file:///dest/{x}", {"x": "."})


def test_url_host_part_takes_only_host_names() -> None:
    url = render_url("sftp://ubuntu@{ip}/home/ubuntu/{name}", {"ip": "10.1.2.3", "name": "a b"})
    parsed = parse_url(url)
    assert (parsed.host, parsed.user, parsed.path) == ("10.1.2.3", "ubuntu", "/home/ubuntu/a b")
    assert parse_url(render_url("sftp://{host}/x", {"host": "gpu-1.example"})).host == "gpu-1.example"
    for bad in ("evil.example/../etc", "a@evil", "h#x", "h?x", "h x", "", "h%2fx", "h\\x"):
        with pytest.raises(TemplateError, match="host"):
            render_url("sftp://ubuntu@{ip}/home/", {"ip": bad})


def test_url_template_needs_a_literal_scheme() -> None:
    with pytest.raises(TemplateError, match="scheme"):
        render_url("{url}", {"url": "file:///etc/"})
    with pytest.raises(TemplateError, match="scheme"):
        render_url("{proto}://h/x", {"proto": "sftp"})


def test_url_lengths() -> None:
    assert render_url("s3://b/k/{x}", {"x": "y" * 300})  # S3 keys have no per-segment limit
    for template in ("file:///d/{x}", "sftp://h/d/{x}"):
        with pytest.raises(TemplateError, match="255 bytes"):
            render_url(template, {"x": "y" * 300})
        assert render_url(template, {"x": "y" * 255})
    with pytest.raises(TemplateError, match="1024 bytes"):
        render_url("s3://b/k/{x}", {"x": "y" * 1100})


def test_url_glob_values_match_only_themselves() -> None:
    url = render_url("sftp://gpu/runs/{job}/*/model", {"job": "a*[b]?"}, glob=True)
    assert parse_url(url).path == "/runs/a[*][[]b][?]/*/model"
    assert parse_url(render_url("sftp://gpu/runs/{job}/*", {"job": "a*"})).path == "/runs/a*/*"


def test_url_literal_text_is_kept_and_fields_fill_it() -> None:
    assert render_url("file:///x/{session}/{camera_id}/recording.mp4", {"session": "s1", "camera_id": "CAM_L"}) == (
        "file:///x/s1/CAM_L/recording.mp4"
    )
    assert render_url("s3://b/{n:03d}.bin", {"n": 5}) == "s3://b/005.bin"
    assert parse_url(render_url("file:///d/{{x}}/{y}", {"y": "a#b"})).path == "/d/{x}/a#b"
    with pytest.raises(TemplateError, match="escape"):
        render_url("file:///d/{{x}}/{y}", {"y": "%2e%2e"})
    with pytest.raises(TemplateError, match="does not fit"):
        render_url("s3://b/{n:03d}.bin", {"n": "five"})
    with pytest.raises(TemplateError, match="needs field 'missing'"):
        render_url("s3://b/{missing}", {})


def test_parse_url_keeps_hash_and_question_mark_in_paths() -> None:
    assert parse_url("sftp://h/a#1").path == "/a#1"
    assert parse_url("s3://b/k/a?1").path == "/k/a?1"
    assert parse_url("sftp://u@h:2222/x?y#z").port == 2222
    assert parse_url("https://h/x?y=1").path == "/x"
    for bad in ("file:///d/%2e%2e/x", "sftp://h/d/%252e%252e/x", "s3://b/../k", "file:///d/%00"):
        with pytest.raises(PermanentError):
            parse_url(bad)


def test_join_name() -> None:
    assert join_name("/dest", "a%2e%2e%2fx") == "/dest/a%2e%2e%2fx"
    assert join_name("/dest/", "a#1") == "/dest/a#1"
    assert join_name("/dest/", "caf\udcff") == "/dest/caf\udcff"
    for bad in ("", ".", "..", "a/b", "a\x00", "%2e%2e", "%252e%252e"):
        with pytest.raises(PermanentError):
            join_name("/dest", bad)
    with pytest.raises(PermanentError, match="UTF-8"):
        check_name("caf\udcff", "s3")


@pytest.mark.parametrize("template", ["{name}", "{a}{name}", "{name}-x", "{a}{b}{name}"])
def test_argv_values_cannot_start_an_option(template: str) -> None:
    values = {"name": "--help", "a": "", "b": ""}
    with pytest.raises(TemplateError, match="allow_dash_values"):
        render_arg(template, values)
    assert render_arg(template, values, allow_leading_dash=True).startswith("--help")


def test_argv_literals_and_values_after_a_prefix_are_fine() -> None:
    values = {"name": "--help", "dir": "-x", "n": 3}
    assert render_arg("-oq", values) == "-oq"
    assert render_arg("--out={name}", values) == "--out=--help"
    assert render_arg("./{name}", values) == "./--help"
    assert render_arg("x{dir}", values) == "x-x"
    assert render_arg("-{n}", values) == "-3"
    for text in ("a;b", "$(id)", "`id`", "a b", "a\nb", "caf\udcff", "..", "../../etc/passwd"):
        assert render_arg("{v}", {"v": text}) == text  # no shell: verbatim
    with pytest.raises(TemplateError):
        render_arg("{n}", {"n": -1})


def test_render_path_stays_in_its_folder(tmp_path: Path) -> None:
    assert render_path("{name}.manifest.json", {"name": "a#b c"}, tmp_path) == tmp_path / "a#b c.manifest.json"
    assert render_path("{s}/{c}.json", {"s": "s1", "c": "L"}, tmp_path) == tmp_path / "s1" / "L.json"
    assert render_path("{name}", {"name": "caf\udcff"}, tmp_path) == tmp_path / "caf\udcff"
    for template, values in [("{x}", {"x": "/etc/passwd"}), ("{x}", {"x": "../x"}), ("{x}.json", {"x": "a/b"}),
                             ("/etc/{x}", {"x": "y"}), ("{x}", {"x": ".."}), ("{x}", {"x": "."}),
                             ("{x}", {"x": ""}), ("{x}/y", {"x": ""}), ("{x}", {"x": "%2e%2e"}),
                             ("a/../{x}", {"x": "y"}), ("{x}", {"x": "y" * 300})]:  # fmt: skip
        with pytest.raises(TemplateError):
            render_path(template, values, tmp_path)


def test_render_text_is_verbatim() -> None:
    assert render_text("{a} {b}", {"a": "$(id)", "b": "-x ../y"}) == "$(id) -x ../y"
    assert template_fields("s3://b/{session}/{name}") == ["session", "name"]
    with pytest.raises(TemplateError, match="malformed"):
        template_fields("{unclosed")
    with pytest.raises(TemplateError, match="plain name"):
        render_text("{a.__class__}", {"a": 1})


@pytest.mark.parametrize("path", ["/a%41b", "/a#1", "/k/a?1", "/caf\u00e9 x", "/x%2e%2e%2fy", "/a%"])
def test_format_url_round_trips(path: str) -> None:
    for url in ("sftp://u@h:2222/", "s3://bucket/", "file:///"):
        parsed = parse_url(url).with_path(path)
        assert parse_url(format_url(parsed)) == parsed
    local = parse_url("file:///").with_path("localhost/x")
    assert parse_url(format_url(local)).path == "./localhost/x"


def test_exec_options_and_captured_fields() -> None:
    with pytest.raises(ValueError, match="variable name"):
        ExecOptions(argv=["true"], env={"A-B": "x"})
    with pytest.raises(ValueError, match=r"write \$HOME"):
        ExecOptions(argv=["true"], env={"X": "${HOME}"})
    assert captured_fields('chatter\n{"model_dir": "/m"}\n') == {"model_dir": "/m"}
    with pytest.raises(PermanentError, match="shadow a built-in"):
        captured_fields('{"path": "/etc/shadow", "ok": 1}')
