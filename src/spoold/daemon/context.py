"""The step context: the daemon's side of `handlers.base.StepContext` for one running step.

Everything a handler may see or do goes through here. State changes a step
causes (running -> waiting and back) are written to the sidecar and reported
to the main loop through `ItemEnv.report_state`; nothing here touches loop state.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold.cache import Cache
from spoold.daemon.arriving import ArrivingItem
from spoold.daemon.config import Config, Queue
from spoold.daemon.layout import QueueFolders
from spoold.daemon.sidecar import Sidecar
from spoold.errors import Interrupted
from spoold.handlers.base import ArrivingBundle, Checkpoint, ItemKind
from spoold.ratelimit import Limiter, TokenBucket, shared_bucket
from spoold.templates import BUILTIN_NAMES, DIGEST_NAMES, is_url_template, render, render_url
from spoold.transports import TransportPool

RATE_SAMPLE_SECONDS = 0.5


@dataclasses.dataclass(frozen=True)
class ItemEnv:
    """What every step of one item's run shares."""

    config: Config
    queue: Queue
    folders: QueueFolders
    sidecar: Sidecar
    transports: TransportPool
    stop_event: threading.Event
    report_state: Callable[[str], None]
    hand_over: Callable[[ItemContext, str, list[Path], Mapping[str, Any], str | None], str]
    free_bytes: Callable[[], int]

    @property
    def spool_rate(self) -> TokenBucket | None:
        """The daemon's one bucket for the top-level `rate:` (kept across reloads; see `ratelimit.shared_bucket`)."""
        return shared_bucket(self.config.spool, self.config.rate_bps)


class SidecarCheckpoint:
    def __init__(self, sidecar: Sidecar, entry: dict[str, Any]) -> None:
        self._sidecar = sidecar
        self.data: dict[str, Any] = entry.setdefault("checkpoint", {})

    def save(self) -> None:
        self._sidecar.write()


class ItemContext:
    """One running step's view of its item."""

    def __init__(self, env: ItemEnv, index: int, arriving: ArrivingItem | None) -> None:
        sidecar = env.sidecar
        doc = sidecar.doc
        self._env = env
        self._index = index
        entry = sidecar.step_entry(index)
        self.queue = env.queue.name
        self.item = sidecar.name
        self.kind: ItemKind = doc["kind"]
        self.item_dir = env.folders.work / self.item
        self.payload = [self.item_dir / p for p in doc["payload"]]
        self.extras = [self.item_dir / p for p in doc["extras"]]
        self.fields: dict[str, Any] = doc["fields"]
        self.digests: dict[str, dict[str, str]] = doc["digests"]
        self.checkpoint: Checkpoint = SidecarCheckpoint(sidecar, entry)
        self.min_free_bytes = env.config.min_free_bytes
        self.arriving: ArrivingBundle | None = arriving
        self.log = logging.LoggerAdapter(logging.getLogger(f"spoold.{entry['name']}"), {"item": self.item})
        self._rate_sample: tuple[float, int] | None = None

    def template_values(self) -> dict[str, Any]:
        """The item's fields, then the built-ins over them: a field can never replace `path`, `name`, ..."""
        name = self.item
        stem, dot, ext = name.rpartition(".")
        values: dict[str, Any] = {k: v for k, v in self.fields.items() if k not in BUILTIN_NAMES}
        if len(self.digests) == 1:
            digests = next(iter(self.digests.values()))
            values.update({k: v for k, v in digests.items() if k in DIGEST_NAMES})
        values.update({
            "name": name, "stem": stem if dot else name, "ext": ext if dot else "", "queue": self.queue,
            "host": self._env.config.host, "date": datetime.now(UTC).strftime("%Y-%m-%d"),
            "original_name": self._env.sidecar.doc["original_name"], "item": name, "item_dir": str(self.item_dir),
            "path": str(self.payload[0]) if self.payload else str(self.item_dir),
        })  # fmt: skip
        return values

    def render(self, template: str) -> str:
        """A URL template (`scheme://...`) is rendered by `render_url`, anything else by `render`."""
        values = self.template_values()
        if is_url_template(template):
            return render_url(template, values)
        return render(template, values)

    def progress(self, done: int, total: int | None, **extra: Any) -> None:
        """`total` None: nobody said how much there is, and the sidecar says so (`bytes_total`, `eta_s` null)."""
        now = time.monotonic()
        progress: dict[str, Any] = {"bytes_done": done, "bytes_total": total, **extra}
        if total is None:
            progress["eta_s"] = None
        # Going backwards (a server that ignored Range, a restarted part) starts a new rate sample.
        if self._rate_sample is None or done < self._rate_sample[1]:
            self._rate_sample = (now, done)
        elif now - self._rate_sample[0] >= RATE_SAMPLE_SECONDS:
            rate = (done - self._rate_sample[1]) / (now - self._rate_sample[0])
            self._rate_sample = (now, done)
            progress["rate_bps"] = round(rate)
            is_known = total is not None and rate > 0 and total >= done
            progress["eta_s"] = round(((total or 0) - done) / rate, 1) if is_known else None
        # Progress means a wait is over (e.g. a download resumed after free space came back).
        if self._env.sidecar.set_progress(self._index, progress):
            self._env.report_state("running")

    def waiting(self, message: str, next_check_in_seconds: float) -> None:
        if self._env.sidecar.set_waiting(self._index, message, time.time() + next_check_in_seconds):
            self._env.report_state("waiting")

    def sleep(self, seconds: float) -> None:
        if self._env.stop_event.wait(max(seconds, 0.0)):
            raise Interrupted("the daemon is stopping")

    def check_stop(self) -> None:
        if self._env.stop_event.is_set():
            raise Interrupted("the daemon is stopping")

    def limiter(self, rate_bps: int | None) -> Limiter:
        """A bucket of the step's own for `rate_bps` (None: no cap of its own) plus the spool's, stopped on stop."""
        buckets = [TokenBucket(rate_bps)] if rate_bps else []
        if (shared := self._env.spool_rate) is not None:
            buckets.append(shared)
        return Limiter(buckets, self._env.stop_event)

    def transport(self, url: str, settings: Mapping[str, Any]) -> Any:
        return self._env.transports.get(url, settings)

    def hand_over(self, queue: str, paths: list[Path], fields: Mapping[str, Any], name: str | None = None) -> str:
        return self._env.hand_over(self, queue, paths, fields, name)

    def free_bytes(self) -> int:
        return self._env.free_bytes()

    @property
    def cache(self) -> Cache | None:
        return self._env.config.cache
