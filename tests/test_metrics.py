"""metrics.prom: the counters and histograms of SPEC section 4, read back with Prometheus' own parser."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from spoold.daemon.health import NodeStatus
from spoold.daemon.messages import StepEnded
from spoold.daemon.metrics import DURATION_BUCKETS_SECONDS, Metrics
from tests.conftest import DaemonProcess, sidecar_state, wait_for

# bad* fails for good, flaky* asks to be retried on its first run only (a marker file remembers), the rest pass.
STEP_SCRIPT = """\
import os, sys
name, marker = sys.argv[1], sys.argv[2]
if name.startswith("bad"):
    sys.exit(1)
if name.startswith("flaky") and not os.path.exists(marker):
    open(marker, "w").close()
    sys.exit(75)
"""

CONFIG = """\
spool: {spool}
queues:
  q:
    settle: 0.1s
    retry: {delays: [0.2s]}
    chain:
      - exec: {argv: [PYTHON, '{tmp}/step.py', '{name}', '{tmp}/flaky.marker']}
      - ship: {to: 'file://{tmp}/shipped/'}
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, labels); the parser's family names are not used (it renames counters)."""
    samples: Samples = {}
    for metric_family in text_string_to_metric_families(text):
        for sample in metric_family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"sample {key} appears twice"
            samples[key] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def check_with_promtool(path: Path) -> None:
    """`promtool check metrics` lints the file as Prometheus would, when it is installed (package prometheus)."""
    promtool = shutil.which("promtool")
    if promtool is None:
        return
    with path.open("rb") as stdin:
        result = subprocess.run([promtool, "check", "metrics"], stdin=stdin, capture_output=True, text=True,
                                timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_counters_and_histograms_after_a_known_mix(
    write_config: Callable[[str], Path], daemon: Callable[..., DaemonProcess], spool: Path, tmp_path: Path
) -> None:
    (tmp_path / "step.py").write_text(STEP_SCRIPT)
    inbox = spool / "q" / "inbox"
    inbox.mkdir(parents=True)
    sizes = {"ok1.bin": 100, "ok2.bin": 250, "flaky.bin": 50, "bad.bin": 7}
    for name, size in sizes.items():
        (inbox / name).write_bytes(b"x" * size)
    os.symlink(tmp_path / "step.py", inbox / "evil.bin")  # rejected unread: a symlink in an inbox
    started = time.time()
    daemon(write_config(CONFIG.replace("PYTHON", sys.executable)))

    for name in ("ok1.bin", "ok2.bin", "flaky.bin"):
        wait_for(sidecar_state(spool, "q", name, "done"), 20, f"{name} done")
    wait_for(sidecar_state(spool, "q", "bad.bin", "failed"), 20, "bad.bin failed")
    rejected = wait_for(sidecar_state(spool, "q", "evil.bin", "failed"), 20, "evil.bin rejected")
    assert rejected["error"]["type"] == "rejected"

    def final() -> Samples | None:
        # metrics.prom is rewritten every few seconds: wait for the one that counts every item's end.
        try:
            samples = parse((spool / "metrics.prom").read_text())
        except FileNotFoundError:
            return None
        ended = [samples.get(("spoold_items_total", frozenset({"queue": "q", "outcome": o}.items()))) for o in
                 ("done", "failed", "rejected")]  # fmt: skip
        return samples if ended == [3, 1, 1] else None

    samples = wait_for(final, 20, "metrics.prom counting all five items")
    check_with_promtool(spool / "metrics.prom")

    assert value(samples, "spoold_items", queue="q", state="done") == 3
    assert value(samples, "spoold_items", queue="q", state="failed") == 2
    assert value(samples, "spoold_items", queue="q", state="running") == 0
    assert value(samples, "spoold_ready") == 1
    assert value(samples, "spoold_intake_paused") == 0
    assert value(samples, "spoold_spool_free_bytes") > 0

    attempts = {(step, result): value(samples, "spoold_step_attempts_total", queue="q", step=step, result=result)
                for step in ("exec", "ship") for result in ("ok", "retry", "failed")}  # fmt: skip
    assert attempts == {("exec", "ok"): 3, ("exec", "retry"): 1, ("exec", "failed"): 1,
                        ("ship", "ok"): 3, ("ship", "retry"): 0, ("ship", "failed"): 0}  # fmt: skip
    # Bytes count for the transfer steps only: the three files that were shipped.
    assert value(samples, "spoold_bytes_total", queue="q", step="ship") == 100 + 250 + 50
    assert not any(name == "spoold_bytes_total" and ("step", "exec") in labels for name, labels in samples)

    for step, count in (("exec", 5), ("ship", 3)):
        name = "spoold_step_duration_seconds"
        assert value(samples, f"{name}_count", queue="q", step=step) == count
        assert 0 < value(samples, f"{name}_sum", queue="q", step=step) < 60
        buckets = [value(samples, f"{name}_bucket", queue="q", step=step, le=repr(b)) for b in DURATION_BUCKETS_SECONDS]
        assert buckets == sorted(buckets), "buckets are cumulative"
        assert value(samples, f"{name}_bucket", queue="q", step=step, le="+Inf") == count
        assert buckets[-1] == count, "no test step takes hours"

    assert started <= value(samples, "spoold_last_done_timestamp_seconds", queue="q") <= time.time()


def test_label_values_are_escaped() -> None:
    # Queue and step names come from the config; escape them anyway, as the exposition format says.
    odd_queue, odd_step = 'a"b\\c\nd', "st{ep}=,x"
    metrics = Metrics()
    metrics.item_ended(odd_queue, "done", 1_700_000_000.5)
    metrics.step_ended(StepEnded(odd_queue, odd_step, "ok", 0.02, 1234))
    metrics.step_ended(StepEnded(odd_queue, odd_step, "retry", 4000.0, None))
    status = NodeStatus("2026-01-01T00:00:00Z", {odd_queue: {"queued": 2}}, 10, 0, False, True, None, Path("/"))
    samples = parse(status.metrics_text(metrics))
    assert value(samples, "spoold_items", queue=odd_queue, state="queued") == 2
    assert value(samples, "spoold_items_total", queue=odd_queue, outcome="done") == 1
    assert value(samples, "spoold_last_done_timestamp_seconds", queue=odd_queue) == 1_700_000_000.5
    assert value(samples, "spoold_step_attempts_total", queue=odd_queue, step=odd_step, result="ok") == 1
    assert value(samples, "spoold_bytes_total", queue=odd_queue, step=odd_step) == 1234
    duration = "spoold_step_duration_seconds"
    assert value(samples, f"{duration}_bucket", queue=odd_queue, step=odd_step, le="0.05") == 1
    assert value(samples, f"{duration}_bucket", queue=odd_queue, step=odd_step, le="3600.0") == 1
    assert value(samples, f"{duration}_bucket", queue=odd_queue, step=odd_step, le="7200.0") == 2
    assert value(samples, f"{duration}_sum", queue=odd_queue, step=odd_step) == 4000.02
