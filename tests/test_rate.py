"""`rate:` caps: a step's own and the spool-wide one, over real SFTP (sshd), moto S3 and file://; prompt stops.

Timed transfers are 20 MiB at 4 MiB/s (about 5 s): each must take within 10% of
the time the cap allows, and no second may carry more than twice the cap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from spoold.daemon.config import parse_config
from spoold.errors import ConfigError, Interrupted
from spoold.options import parse_rate
from spoold.ratelimit import Limiter, TokenBucket, shared_bucket
from spoold.transports.base import TransferContext, parse_url
from tests.conftest import DaemonProcess, read_sidecar, sidecar_state, wait_for
from tests.sshd import Sshd
from tests.test_s3 import S3Server
from tests.transfer_samples import TransferSamples

Start = Callable[..., DaemonProcess]
WriteConfig = Callable[[str], Path]
MiB = 1 << 20
SIZE = 20 * MiB
RATE = 4 * MiB
EXPECTED_SECONDS = SIZE / RATE



def capped(samples: TransferSamples, checkpoint: dict[str, Any] | None = None, rate: int = RATE) -> TransferContext:
    return TransferContext(progress=samples.add, checkpoint={} if checkpoint is None else checkpoint,
                           save_checkpoint=lambda: None, check_stop=lambda: None,
                           limiter=Limiter([TokenBucket(rate)]))  # fmt: skip


def assert_paced(seconds: float, samples: TransferSamples | None = None) -> None:
    assert abs(seconds - EXPECTED_SECONDS) <= 0.1 * EXPECTED_SECONDS, f"took {seconds:.2f}s, expected ~5s"
    if samples is not None and samples.points:
        assert samples.max_second_bytes() <= 2 * RATE, f"a second carried {samples.max_second_bytes()} bytes"


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    source = tmp_path / "payload.bin"
    source.write_bytes(os.urandom(SIZE))
    return source


# -- the bucket ---------------------------------------------------------------------------------------------


def test_a_bucket_holds_a_fifth_of_a_second_and_runs_into_debt() -> None:
    now = [0.0]
    bucket = TokenBucket(10 * MiB, clock=lambda: now[0])
    assert bucket.burst_bytes == 2 * MiB
    assert bucket.reserve(2 * MiB) == 0.0
    assert bucket.reserve(MiB) == pytest.approx(0.1)  # in debt: wait until it is paid
    now[0] = 60.0  # an idle minute refills only the burst
    assert bucket.reserve(2 * MiB) == 0.0
    assert bucket.reserve(1) > 0


def test_a_stop_interrupts_a_wait_at_once() -> None:
    stop = threading.Event()
    limiter = Limiter([TokenBucket(4096)], stop)
    limiter.acquire(4096)  # the burst: no wait
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        limiter.acquire(10 * 4096)  # ten seconds' worth
    assert time.monotonic() - started < 0.5


def test_the_spool_bucket_outlives_a_reload(tmp_path: Path) -> None:
    first = shared_bucket(tmp_path / "spool", 4 * MiB)
    again = shared_bucket(tmp_path / "spool", 8 * MiB)
    assert first is again and again is not None and again.rate_bps == 8 * MiB
    assert shared_bucket(tmp_path / "spool", None) is None


# -- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [("2MiB/s", 2 * MiB), ("500KB/s", 500_000), (" 1.5 MiB/s", 3 * MiB // 2),
                                                (1_000_000, 1_000_000), ("64kib/s", 65536)])  # fmt: skip
def test_rates_read_like_sizes_per_second(text: object, expected: int) -> None:
    assert parse_rate(text) == expected


def _config(rate: str, where: str) -> str:
    top = f"rate: {rate}\n" if where == "top" else ""
    step = f", rate: {rate}" if where == "step" else ""
    return (f"spool: /tmp/x\n{top}queues:\n  out:\n    chain:\n"
            f"      - ship: {{to: 'file:///tmp/y/'{step}}}\n")  # fmt: skip


@pytest.mark.parametrize("where", ["top", "step"])
@pytest.mark.parametrize("rate", ["0", "-1", "0/s", "'-2MiB/s'", "fast", "2MiB", "true", "1.5", "2MiB/h"])
def test_a_bad_rate_is_a_config_error(rate: str, where: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(_config(rate, where), "spoold.yaml")
    assert "rate" in caught.value.describe()


def test_spoold_check_exits_78_on_a_bad_rate(tmp_path: Path) -> None:
    path = tmp_path / "spoold.yaml"
    path.write_text(_config("0MiB/s", "top"))
    done = subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(path)], capture_output=True, text=True)
    assert done.returncode == 78
    assert "spoold.yaml:2: rate: a rate must be more than zero" in done.stderr
    path.write_text(_config("3MiB/s", "step"))
    assert subprocess.run([sys.executable, "-m", "spoold", "check", "-c", str(path)]).returncode == 0


def test_the_parsed_config_carries_both_rates() -> None:
    config = parse_config(_config("2MiB/s", "top"), "a.yaml")
    assert config.rate_bps == 2 * MiB
    step = parse_config(_config("1MiB/s", "step"), "b.yaml").queues["out"].steps[0]
    assert step.handler.options.rate == MiB


# -- each transport, timed ----------------------------------------------------------------------------------


def test_sftp_upload_and_download_keep_to_the_cap(sshd: Sshd, tmp_path: Path, payload: Path) -> None:
    from spoold.transports.sftp import SftpTransport

    settings = {"identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts)}
    transport = SftpTransport(parse_url(sshd.url("/")), settings)
    remote = tmp_path / "far" / "payload.bin"
    try:
        transport.stat(str(tmp_path))  # connected before the clock starts: the handshake is not the transfer
        samples = TransferSamples()
        started = time.monotonic()
        transport.put_file(payload, str(remote), {}, capped(samples))
        assert_paced(time.monotonic() - started, samples)
        assert remote.read_bytes() == payload.read_bytes()
        samples = TransferSamples()
        (tmp_path / "back").mkdir()
        started = time.monotonic()
        transport.get_tree(str(remote), tmp_path / "back", capped(samples))
        assert_paced(time.monotonic() - started, samples)
        assert (tmp_path / "back" / "payload.bin").read_bytes() == payload.read_bytes()
    finally:
        transport.close()


@pytest.fixture
def moto(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    from tests.test_s3 import DUMMY_ENV

    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    yield S3Server(moto_s3, DUMMY_ENV)


def test_s3_multipart_upload_and_ranged_download_keep_to_the_cap(moto: S3Server, tmp_path: Path,
                                                                 payload: Path) -> None:  # fmt: skip
    from spoold.transports.s3 import S3Transport

    moto.client().create_bucket(Bucket="rated")
    transport = S3Transport(parse_url("s3://rated/"), {"endpoint_url": moto.endpoint, "part_size": 5 * MiB,
                                                       "concurrency": 4})  # fmt: skip
    try:
        samples = TransferSamples()
        started = time.monotonic()
        transport.put_file(payload, "payload.bin", {}, capped(samples))
        assert_paced(time.monotonic() - started, samples)
        samples = TransferSamples()
        (tmp_path / "back").mkdir()
        started = time.monotonic()
        transport.get_tree("payload.bin", tmp_path / "back", capped(samples))
        assert_paced(time.monotonic() - started, samples)
        assert (tmp_path / "back" / "payload.bin").read_bytes() == payload.read_bytes()
    finally:
        transport.close()


def test_a_file_copy_keeps_to_the_cap(tmp_path: Path, payload: Path) -> None:
    from spoold.transports.local import LocalTransport

    transport = LocalTransport(parse_url(f"file://{tmp_path}/"), {})
    samples = TransferSamples()
    started = time.monotonic()
    transport.put_file(payload, str(tmp_path / "copy.bin"), {}, capped(samples))
    assert_paced(time.monotonic() - started, samples)
    assert (tmp_path / "copy.bin").read_bytes() == payload.read_bytes()


# -- through the daemon -------------------------------------------------------------------------------------


def _drop(spool: Path, queue: str, name: str, data: bytes) -> None:
    inbox = spool / queue / "inbox"
    (inbox / f".{name}.tmp").write_bytes(data)
    os.rename(inbox / f".{name}.tmp", inbox / name)


def _span(doc: dict[str, Any]) -> tuple[float, float]:
    ship = next(s for s in doc["steps"] if s["name"] == "ship")
    return (datetime.fromisoformat(ship["started"]).timestamp(), datetime.fromisoformat(ship["finished"]).timestamp())


def test_the_spool_wide_rate_caps_two_transfers_together(write_config: WriteConfig, spool: Path, tmp_path: Path,
                                                         daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        rate: 4MiB/s
        queues:
          out:
            settle: 0s
            concurrency: 2
            chain:
              - ship: {to: 'file://{tmp}/shipped/'}
        """)
    daemon(config)
    data = {name: os.urandom(SIZE // 2) for name in ("a.bin", "b.bin")}
    for name, content in data.items():
        _drop(spool, "out", name, content)
    spans = [_span(wait_for(sidecar_state(spool, "out", name, "done"), 30, f"{name} shipped")) for name in data]
    assert max(s[0] for s in spans) < min(s[1] for s in spans), "the two transfers ran at the same time"
    assert_paced(max(s[1] for s in spans) - min(s[0] for s in spans))
    for name, content in data.items():
        assert (tmp_path / "shipped" / name).read_bytes() == content


def test_the_stricter_of_the_step_and_spool_rates_wins(write_config: WriteConfig, spool: Path, tmp_path: Path,
                                                       daemon: Start) -> None:  # fmt: skip
    config = write_config("""\
        spool: {spool}
        rate: 64MiB/s
        queues:
          out:
            settle: 0s
            chain:
              - ship: {to: 'file://{tmp}/shipped/', rate: 4MiB/s}
        """)
    daemon(config)
    _drop(spool, "out", "c.bin", os.urandom(SIZE))
    started, finished = _span(wait_for(sidecar_state(spool, "out", "c.bin", "done"), 30, "shipped"))
    assert_paced(finished - started)


# -- stop promptness ----------------------------------------------------------------------------------------


def test_sigterm_stops_a_capped_sftp_upload_within_two_seconds_and_the_next_start_resumes(
    sshd: Sshd, write_config: WriteConfig, spool: Path, tmp_path: Path, daemon: Start
) -> None:
    dest = tmp_path / "far"
    options = {"to": sshd.url(f"{dest}/"), "identity": str(sshd.identity), "known_hosts": str(sshd.known_hosts),
               "rate": "2MiB/s"}  # fmt: skip
    config = write_config(f"""\
        spool: {{spool}}
        queues:
          out:
            settle: 0s
            chain:
              - ship: {json.dumps(options)}
        """)
    data = os.urandom(SIZE)
    first = daemon(config)
    _drop(spool, "out", "big.bin", data)

    def sending() -> bool:
        doc = read_sidecar(spool, "out", "big.bin")
        progress = doc["steps"][0].get("progress", {}) if doc and doc.get("steps") else {}
        return progress.get("bytes_done", 0) >= 3 * MiB

    wait_for(sending, 30, "the upload under way")
    first.signal(signal.SIGTERM)
    assert first.process is not None
    started = time.monotonic()
    first.process.wait(timeout=10)
    assert time.monotonic() - started < 2.0, first.log()
    doc = read_sidecar(spool, "out", "big.bin")
    assert doc is not None
    (transfer,) = doc["steps"][0]["checkpoint"]["transfer"].values()
    assert 0 < transfer["offset"] < SIZE
    assert not (dest / "big.bin").exists()

    second = daemon(config)
    wait_for(sidecar_state(spool, "out", "big.bin", "done"), 30, "the upload finished")
    assert (dest / "big.bin").read_bytes() == data
    assert f"resuming upload at {transfer['offset']} of {SIZE} bytes" in second.log()


def _stopping_after(nbytes: int, checkpoint: dict[str, Any]) -> tuple[TransferContext, list[int]]:
    """A capped context whose daemon 'stops' once `nbytes` have moved; the progress it heard."""
    stop, heard = threading.Event(), []

    def progress(done: int, _total: int) -> None:
        heard.append(done)
        if done >= nbytes:
            stop.set()

    def check_stop() -> None:
        if stop.is_set():
            raise Interrupted("stopping for the test")

    ctx = TransferContext(progress=progress, checkpoint=checkpoint, save_checkpoint=lambda: None,
                          check_stop=check_stop, limiter=Limiter([TokenBucket(RATE)], stop))  # fmt: skip
    return ctx, heard


def test_a_stopped_file_copy_resumes_from_its_offset(tmp_path: Path, payload: Path) -> None:
    from spoold.transports.local import LocalTransport

    transport = LocalTransport(parse_url(f"file://{tmp_path}/"), {})
    checkpoint: dict[str, Any] = {}
    ctx, _ = _stopping_after(5 * MiB, checkpoint)
    with pytest.raises(Interrupted):
        transport.put_file(payload, str(tmp_path / "copy.bin"), {}, ctx)
    offset = checkpoint["offset"]
    assert 5 * MiB <= offset < SIZE and not (tmp_path / "copy.bin").exists()
    ctx, heard = _stopping_after(SIZE + 1, checkpoint)
    transport.put_file(payload, str(tmp_path / "copy.bin"), {}, ctx)
    assert heard[0] > offset, "the copy went on from the offset"
    assert (tmp_path / "copy.bin").read_bytes() == payload.read_bytes()


def test_a_stop_ends_a_capped_s3_part_at_once_and_the_upload_resumes(moto: S3Server, tmp_path: Path,
                                                                     payload: Path) -> None:  # fmt: skip
    from spoold.transports.s3 import S3Transport

    moto.client().create_bucket(Bucket="stopped")
    transport = S3Transport(parse_url("s3://stopped/"), {"endpoint_url": moto.endpoint, "part_size": 10 * MiB,
                                                         "concurrency": 2})  # fmt: skip
    checkpoint: dict[str, Any] = {}
    try:
        ctx, _ = _stopping_after(2 * MiB, checkpoint)  # mid-part: each part is 10 MiB
        started = time.monotonic()
        with pytest.raises(Interrupted):
            transport.put_file(payload, "payload.bin", {}, ctx)
        assert time.monotonic() - started < 1.5, "the stop came at 0.5 s; the parts in flight ended with it"
        assert checkpoint["upload_id"] and checkpoint["parts"] == {}
        ctx, _ = _stopping_after(SIZE + 1, checkpoint)
        transport.put_file(payload, "payload.bin", {}, ctx)
        reply = moto.client().get_object(Bucket="stopped", Key="payload.bin")
        assert reply["Body"].read() == payload.read_bytes()
    finally:
        transport.close()
