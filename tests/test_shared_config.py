"""A shared queue's options (`source`, `claim`, `poll`, the S3 options) are checked by `spoold check`.

Each bad shape is one line naming the file, the YAML path and the line, exit 78, no network needed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from spoold.daemon.config import parse_config

EX_CONFIG = 78
REPO = Path(__file__).resolve().parent.parent

GOOD = """\
spool: {spool}
host: node-a
queues:
  jobs:
    source: 's3://fleet/jobs/'
    endpoint_url: 'http://127.0.0.1:9'
    region: us-east-1
    claim: {{lease: 5s}}
    poll: 500ms
    chain:
      - exec: {{argv: [/bin/true]}}
"""

# (name, yaml, YAML path expected in the message, words expected in the message)
BAD = [
    ("no-trailing-slash", GOOD.replace("s3://fleet/jobs/", "s3://fleet/jobs"), "queues.jobs.source", "end with '/'"),
    ("not-s3", GOOD.replace("s3://fleet/jobs/", "sftp://host/jobs/"), "queues.jobs.source", "s3://"),
    ("short-lease", GOOD.replace("lease: 5s", "lease: 2s"), "queues.jobs.claim", "at least 5s"),
    ("claim-without-source", GOOD.replace("    source: 's3://fleet/jobs/'\n", ""), "queues.jobs",
     "belong to a shared queue"),
    ("tiny-poll", GOOD.replace("poll: 500ms", "poll: 1ms"), "queues.jobs.source", "poll"),
    ("forward-into-shared", GOOD + """\
  local:
    chain:
      - forward: {{to: jobs}}
""", "queues.local.chain[0].forward", "shared queue"),
    ("gather", GOOD.replace("    poll: 500ms\n", "    poll: 500ms\n    gather: {{by: '{{s}}', expect: {{c: [A]}}}}\n"),
     "queues.jobs.gather", "cannot gather"),
]


def check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(path)], capture_output=True,
                          text=True, timeout=30, cwd=path.parent)  # fmt: skip


@pytest.mark.parametrize(("text", "yaml_path", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_shared_queue_is_one_clear_line(tmp_path: Path, text: str, yaml_path: str, words: str) -> None:
    path = tmp_path / "spoold.yaml"
    path.write_text(text.format(spool=tmp_path / "spool"))
    result = check(path)
    assert result.returncode == EX_CONFIG, result
    [line] = result.stderr.splitlines()
    assert "Traceback" not in result.stderr
    assert f": {yaml_path}: " in line, line
    assert words in line, line


def test_good_shared_queue_parses(tmp_path: Path) -> None:
    config = parse_config(GOOD.format(spool=tmp_path / "spool"), "test")
    shared = config.queues["jobs"].shared
    assert shared is not None
    assert (shared.bucket, shared.prefix, shared.lease_seconds, shared.poll_seconds) == ("fleet", "jobs/", 5.0, 0.5)
    assert shared.settings["endpoint_url"] == "http://127.0.0.1:9"
    assert shared.key("claims", "x.json") == "jobs/claims/x.json"
    assert config.host == "node-a"


def test_the_shared_worker_example_checks(write_config: Callable[[str], Path]) -> None:
    text = (REPO / "etc" / "003-worker-shared.yaml").read_text()
    path = write_config(textwrap.dedent(text).replace("/var/spool/spoold", "./spool").replace(
        "/var/cache/spoold", "./cache"))  # fmt: skip
    result = check(path)
    assert result.returncode == 0, result.stderr
