"""`spoold check`: every config error is one line naming the file, the YAML path and the line; exit 78."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from spoold.daemon.config import EMBEDDED_DEFAULT, load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
EX_CONFIG = 78


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=30, cwd=path.parent)  # fmt: skip


# (name, yaml, YAML path expected in the message, line, words expected in the message)
BAD_CONFIGS = [
    ("unknown-key", """\
        spool: {spool}
        queues:
          q:
            chian: [checksum]
        """, "queues.q.chian", 4, "unknown key"),
    ("unknown-top-key", """\
        spool: {spool}
        queuez: {}
        queues:
          q: {chain: [checksum]}
        """, "queuez", 2, "did you mean 'queues'"),
    ("bad-duration", """\
        spool: {spool}
        queues:
          q:
            chain: [checksum]
            settle: 5 parsecs
        """, "queues.q.settle", 5, "duration"),
    ("bad-retry-delay", """\
        spool: {spool}
        queues:
          q:
            chain: [checksum]
            retry: {attempts: 3, delays: [0s, soon]}
        """, "queues.q.retry.delays[1]", 5, "duration"),
    ("bad-size", """\
        spool: {spool}
        min_free: lots
        queues:
          q: {chain: [checksum]}
        """, "min_free", 2, "size"),
    ("unknown-handler", """\
        spool: {spool}
        queues:
          q:
            chain:
              - checksum: {}
              - encodez: {fps: 30}
        """, "queues.q.chain[1].encodez", 6, "unknown handler"),
    ("bad-option-name", """\
        spool: {spool}
        queues:
          q:
            chain:
              - ship: {too: 'file:///tmp/x/'}
        """, "queues.q.chain[0].ship.too", 5, "did you mean 'to'"),
    ("bad-option-value", """\
        spool: {spool}
        queues:
          q:
            chain:
              - checksum: {algorithms: [sha257]}
        """, "queues.q.chain[0].checksum.algorithms[0]", 5, "sha257"),
    ("missing-required-option", """\
        spool: {spool}
        queues:
          q:
            chain:
              - exec: {timeout: 5s}
        """, "queues.q.chain[0].exec", 5, "argv"),
    ("duplicate-key", """\
        spool: {spool}
        queues:
          q:
            chain: [checksum]
          q:
            chain: [manifest]
        """, "queues.q", 5, "duplicate key"),
    ("forward-to-missing-queue", """\
        spool: {spool}
        queues:
          q:
            chain:
              - forward: {to: nowhere}
        """, "queues.q.chain[0].forward", 5, "nowhere"),
    ("bad-items-kind", """\
        spool: {spool}
        queues:
          q:
            items: folders
            chain: [checksum]
        """, "queues.q.items", 4, "bundles"),
    ("password-in-url", """\
        spool: {spool}
        queues:
          q:
            chain:
              - ship: {to: 'sftp://bob:hunter2@example.org/x/'}
        """, "queues.q.chain[0].ship", 5, "password"),
    ("field-chooses-the-program", """\
        spool: {spool}
        queues:
          q:
            chain:
              - exec: {argv: ['/opt/tools/{tool}', '{name}']}
        """, "queues.q.chain[0].exec", 5, "argv[0]"),
    ("pattern-shadows-a-built-in", """\
        spool: {spool}
        queues:
          q:
            fields: {pattern: '^(?P<path>.+)$'}
            chain: [checksum]
        """, "queues.q.fields.pattern", 4, "shadow"),
    ("limits-depth-zero", """\
        spool: {spool}
        queues:
          q:
            limits: {depth: 0}
            chain: [checksum]
        """, "queues.q.limits", 4, "depth"),
]


@pytest.mark.parametrize(("text", "yaml_path", "line", "words"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])  # fmt: skip
def test_bad_config_is_one_line_with_file_path_and_line(
    write_config: Callable[[str], Path], text: str, yaml_path: str, line: int, words: str
) -> None:
    path = write_config(text)
    result = check(path)
    assert result.returncode == EX_CONFIG, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    message = lines[0]
    assert f"{path}:{line}: {yaml_path}: " in message, message
    assert words in message, message
    assert "hunter2" not in message


def test_malformed_yaml_names_file_and_line(write_config: Callable[[str], Path]) -> None:
    path = write_config("spool: x\nqueues:\n  q:\n    chain: [checksum\n  other: {\n")
    result = check(path)
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"{path}:" in result.stderr and "malformed YAML" in result.stderr
    line = int(result.stderr.split(f"{path}:", 1)[1].split(":", 1)[0])
    assert 4 <= line <= 6


@pytest.mark.parametrize("text", ["", "queues: {}\n", "- a\n- b\n", "queues:\n  q: [checksum]\n"])
def test_empty_or_wrong_shape_is_a_config_error(write_config: Callable[[str], Path], text: str) -> None:
    result = check(write_config(text))
    assert result.returncode == EX_CONFIG
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    result = check(tmp_path / "nope.yaml")
    assert result.returncode == EX_CONFIG
    assert "nope.yaml" in result.stderr and "Traceback" not in result.stderr


def test_valid_config_prints_ok(write_config: Callable[[str], Path]) -> None:
    path = write_config("""\
        spool: {spool}
        min_free: 1GiB
        rescan: 30s
        queues:
          episodes:
            items: bundles
            ready: settle
            settle: 500ms
            concurrency: 2
            fields: {pattern: '^(?P<repo_id>.+)_ep(?P<episode_index>\\d+)$'}
            retry: {attempts: 5, delays: [0s, 5s, 10s, 20s, 40s]}
            keep: {done: delete, failed: 30d}
            chain:
              - checksum: {algorithms: [sha256, xxh3_128, xxh64, md5], sumfile: true}
              - manifest: {}
              - exec: {argv: [/bin/true, '{name}'], timeout: 1m, capture_fields: false}
              - forward: outgoing
          outgoing:
            chain:
              - ship: {to: 'file://{tmp}/out/{repo_id}/', delete_source: true}
        """)
    result = check(path)
    assert result.returncode == 0, result.stderr
    assert "ok (2 queues, 5 steps" in result.stdout
    config = load_config(path)
    assert config.min_free_bytes == 1 << 30
    assert config.rescan_seconds == 30
    assert config.queues["episodes"].spec.settle == 0.5
    assert config.queues["episodes"].spec.keep.done == "delete"


def test_embedded_default_matches_spec() -> None:
    config = parse_config(EMBEDDED_DEFAULT, "<embedded default>")
    assert str(config.spool) == "spool"
    assert [s.name for s in config.queues["incoming"].steps] == ["checksum", "manifest", "forward"]
    assert [s.name for s in config.queues["outgoing"].steps] == ["ship"]


EXAMPLES = sorted((REPO / "etc").glob("**/*.yaml")) if (REPO / "etc").is_dir() else []


@pytest.mark.parametrize("example", EXAMPLES, ids=[str(p.relative_to(REPO)) for p in EXAMPLES])
def test_example_configs_load(example: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(example)], capture_output=True,
                            text=True, timeout=30, env={**os.environ})  # fmt: skip
    assert result.returncode == 0, result.stderr
