"""Reading sidecars for `spoold status`: the queue table, one item's timeline (each step, each attempt), and
`--watch`.

What a sidecar holds is mostly a producer's: item names are any bytes (a name that is not UTF-8 arrives as
surrogate-escaped text), fields and error messages quote what producers and remote servers sent. So every
value printed here goes through `shown()` (statusfmt), which makes control characters, bidi overrides and
lone surrogates visible (`\x1b`, `\u202e`, `\xff`) and caps long values; a terminal never receives an escape
sequence from an item. `--json` prints the full values, as JSON with every such character escaped.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spoold.fsio import read_json
from spoold.statusfmt import gather_text, human_bytes, human_seconds, number, progress_text, shown

__all__ = ["ACTIVE", "daemon_state", "load_sidecars", "render_item", "render_table", "shown", "summary", "watch"]

ACTIVE = ("running", "waiting", "retrying", "queued")
# A queue with more items than this is listed in part (the last unfinished and failed), its counts the daemon's.
FULL_READ_LIMIT = 10_000
SHOWN_UNFINISHED = 1_000
SHOWN_FAILED = 200
# Long enough for any real name, step or message; anything longer is a producer's and --json has it whole.
ITEM_VALUE_CHARS = 2000
STATE_CHARS = 20
LOG_TAIL_LINES = 10
CAMERA_LINES = 16


def load_sidecars(status: Path, names: list[str]) -> list[dict[str, Any]]:
    documents = []
    for name in names:
        document = read_json(status / name)
        if document is not None and document.get("schema") == "spoold.status/1":
            documents.append(document)
    return documents


def summary(spool: Path, queues: list[str]) -> dict[str, Any]:
    health = read_json(spool / "health.json")
    result: dict[str, Any] = {"spool": str(spool), "daemon": daemon_state(health), "queues": {}}
    for queue in queues:
        result["queues"][queue] = _queue_summary(spool / queue, queue, health or {})
    return result


def _queue_summary(root: Path, queue: str, health: dict[str, Any]) -> dict[str, Any]:
    """Every item, read from its sidecar; for a queue of more than FULL_READ_LIMIT items, only what is shown."""
    queues = health.get("queues")
    known = queues.get(queue) if isinstance(queues, dict) else None
    known = known if isinstance(known, dict) and all(isinstance(n, int) for n in known.values()) else None
    if known is not None and sum(known.values()) > FULL_READ_LIMIT:
        return _partial(root, known, sum(known.values()))
    names, count = _sidecar_names(root / "status")
    if names is None:
        return _partial(root, known or {}, count)
    counts: dict[str, int] = {}
    documents = load_sidecars(root / "status", names)
    for document in documents:
        counts[str(document.get("state"))] = counts.get(str(document.get("state")), 0) + 1
    return {"counts": counts, "items": [brief(d) for d in documents]}


def _partial(root: Path, counts: dict[str, int], total: int) -> dict[str, Any]:
    """The last unfinished items (in work/) and failed ones (in failed/) by name, with the daemon's counts
    (health.json, a few seconds old at most): listing a million sidecars takes longer than an answer may."""
    shown_names = {*_last_names(root / "work", SHOWN_UNFINISHED), *_last_names(root / "failed", SHOWN_FAILED)}
    documents = load_sidecars(root / "status", sorted(f"{n}.json" for n in shown_names))
    return {"counts": dict(counts), "items": [brief(d) for d in documents], "partial": True, "sidecars": total}


def _sidecar_names(status: Path) -> tuple[list[str] | None, int]:
    """(every sidecar file name, sorted; None beyond FULL_READ_LIMIT) and how many there are."""
    names: list[str] | None = []
    count = 0
    try:
        with os.scandir(status) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    count += 1
                    if names is not None and count <= FULL_READ_LIMIT:
                        names.append(entry.name)
                    else:
                        names = None
    except (FileNotFoundError, NotADirectoryError):
        return [], 0
    return (sorted(names) if names is not None else None), count


def _last_names(folder: Path, n: int) -> list[str]:
    """The last `n` names in `folder`, by name, without holding them all."""
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as entries:
        return heapq.nlargest(n, (e.name for e in entries if not e.name.startswith(".")))
    return []


def daemon_state(health: dict[str, Any] | None) -> dict[str, Any]:
    if health is None:
        return {"running": False}
    heartbeat = health.get("heartbeat", "")
    is_alive = _pid_alive(health.get("pid"))
    return {"running": is_alive, "pid": health.get("pid"), "heartbeat": heartbeat, "status": health.get("status"),
            "disk": health.get("disk")}  # fmt: skip


def _pid_alive(pid: object) -> bool:
    # 0 and negative numbers name process groups; health.json is read, not trusted.
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 31:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def brief(document: dict[str, Any]) -> dict[str, Any]:
    step = _current_step(document)
    return {
        "item": document.get("item"),
        "state": document.get("state"),
        "step": document.get("step"),
        "progress": step.get("progress") if step else None,
        "updated": document.get("updated"),
        "error": _message(document.get("error")),
        "arriving": bool(document.get("arriving")),
        "gather": document.get("gather") if isinstance(document.get("gather"), dict) else None,
    }


def _message(error: object) -> object:
    return error.get("message") if isinstance(error, dict) else error


def _steps(document: dict[str, Any]) -> list[dict[str, Any]]:
    steps = document.get("steps")
    return [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []


def _current_step(document: dict[str, Any]) -> dict[str, Any] | None:
    for step in _steps(document):
        if step.get("state") in ("running", "retrying", "interrupted"):
            return dict(step)
    return None


def render_table(data: dict[str, Any], *, is_all: bool, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((100, 20)).columns
    daemon = data["daemon"]
    if daemon["running"]:
        head = (f"spool {shown(data['spool'])}: daemon running (pid {shown(daemon['pid'], 20)}), "
                f"{shown(daemon.get('status'), 200)}")  # fmt: skip
    else:
        head = f"spool {shown(data['spool'])}: daemon not running"
    lines = [head]
    for queue, info in data["queues"].items():
        counts = ", ".join(f"{n} {shown(s, STATE_CHARS)}" for s, n in sorted(info["counts"].items())) or "empty"
        lines.append(f"\n{shown(queue)}: {counts}")
        if info.get("partial"):
            lines.append(f"  ({info['sidecars']:,} items: only the last unfinished and failed ones are listed; counts "
                         "from the daemon's health.json)")  # fmt: skip
        items = [i for i in info["items"] if is_all or i["state"] in ACTIVE or i["state"] == "failed"]
        if not items:
            continue
        lines.append(f"  {'ITEM':<32} {'STATE':<9} {'STEP':<10} PROGRESS")
        for item in items[-200:]:
            progress = _node(item) + _progress_column(item, width - 56)
            lines.append(f"  {shown(item['item'], 32):<32} {shown(item['state'], STATE_CHARS):<9} "
                         f"{shown(item['step'] or '-', 16):<10} {progress}")  # fmt: skip
    return "\n".join(lines)


def _node(item: dict[str, Any]) -> str:
    """Which node holds an item of a shared queue."""
    return f"[{shown(item['node'], 40)}] " if item.get("node") else ""


def _progress_column(item: dict[str, Any], room: int) -> str:
    if item["state"] == "failed":
        return shown(item.get("error"), max(room, 20))
    progress = item.get("progress")
    progress = progress if isinstance(progress, dict) else {}
    if item["state"] == "waiting" and item.get("gather"):
        return gather_text(item["gather"], room)
    if item.get("arriving"):
        done, total = number(progress.get("bytes_done")), number(progress.get("bytes_total"))
        unit = shown(progress.get("unit", "bytes"), 20)
        return f"{done or 0:.0f} of {total or 0:.0f} {unit} so far; the bundle is still arriving"
    return progress_text(progress, max(room, 40))


# ---- one item: its steps and each step's attempts -----------------------------------------------------------


def _cap(value: object) -> str:
    return shown(value, ITEM_VALUE_CHARS)


def render_item(document: dict[str, Any]) -> str:
    lines = [f"{_cap(document.get('queue'))}/{_cap(document.get('item'))}: {_cap(document.get('state'))}"
             + (f" at {_cap(document['step'])}" if document.get("step") else "")]  # fmt: skip
    if document.get("original_name") != document.get("item"):
        lines.append(f"  dropped as: {_cap(document.get('original_name'))}")
    if isinstance(document.get("gather"), dict):
        lines.append(f"  gather: {_cap(gather_text(document['gather'], ITEM_VALUE_CHARS, is_full=True))}")
    if document.get("arriving"):
        lines.append("  still arriving: the first step runs while the bundle is written; waiting for its marker")
    if document.get("fields"):
        lines.append(f"  fields: {_cap(document['fields'])}")
    width = shutil.get_terminal_size((100, 20)).columns
    for step in _steps(document):
        lines.extend(_step_lines(step, width))
    if document.get("error"):
        lines.append(f"  error: {_cap(_message(document['error']))}")
    if document.get("next_attempt_at"):
        lines.append(f"  next attempt at {_cap(document['next_attempt_at'])}")
    return "\n".join(lines)


def _step_lines(step: dict[str, Any], width: int) -> list[str]:
    """The step's line; one line per attempt when there were several, or one is still to come; while the step
    runs, its progress and the tail of a remote job's log."""
    state = step.get("state", "")
    detail = _cap(state)
    attempt = number(step.get("attempt"))
    history = step.get("history")
    history = [h for h in history if isinstance(h, dict)] if isinstance(history, list) else []
    # One attempt that ended it all: said on the step's own line.
    is_plain = state in ("done", "failed") and len(history) <= 1
    if attempt is not None and attempt > 1:
        detail += f" (attempt {attempt:.0f})"
    if is_plain:
        detail += _outcome_text(history[0] if history else step, with_state=False)
    if step.get("error"):
        detail += f": {_cap(_message(step['error']))}"
    elif state == "skipped" and step.get("skipped"):
        # The reason names the `when:` condition that did not hold, so "why did it not ship?" is answered here.
        detail += f": {_cap(step['skipped'])}"
    lines = [f"  - {_cap(step.get('name')):<10} {detail}"]
    if not is_plain:
        lines.extend(f"      attempt {_cap(h.get('attempt', '?'))}: {_cap(_attempt_text(h))}" for h in history)
    if state == "running":  # a step polling for something (`waiting`) is still running; a gather member is not
        lines.extend(_live_lines(step, width))
    return lines


# How an attempt's end reads: `done in 3.2 s`, `failed after 1.0 s (retried)`, ...
_ENDED = {"done": ("done", "in", ""), "retrying": ("failed", "after", " (retried)"),
          "failed": ("failed", "after", ""), "interrupted": ("interrupted", "after", " (resumed)")}  # fmt: skip


def _outcome_text(record: dict[str, Any], *, with_state: bool = True) -> str:
    """` in 3.2 s, 12.0 MiB at 3.8 MiB/s`; with the state: `failed after 3.2 s, ...`."""
    state = record.get("state")
    ended = _ENDED.get(state) if isinstance(state, str) else None
    word, preposition = (ended[0], ended[1]) if ended else (shown(state, STATE_CHARS), "in")
    seconds, moved = number(record.get("duration_s")), number(record.get("bytes"))
    text = f" {preposition} {human_seconds(seconds)}" if seconds is not None else ""
    if moved is not None:
        text += f", {human_bytes(moved)}" if text else f" {human_bytes(moved)}"
        if seconds:
            text += f" at {human_bytes(moved / seconds)}/s"
    return (word if with_state else "") + text


def _attempt_text(record: dict[str, Any]) -> str:
    text = f"started {shown(record.get('started') or '?', 40)}, " + _outcome_text(record)
    state = record.get("state")
    if state == "interrupted" and not record.get("finished"):
        text += " (the daemon stopped without recording it; resumed)"
    elif isinstance(state, str) and state in _ENDED:
        text += _ENDED[state][2]
    if isinstance(record.get("error"), dict):
        error = record["error"]
        text += f": {shown(error.get('type'), 40)}: {shown(error.get('message'), ITEM_VALUE_CHARS)}"
    return text


def _live_lines(step: dict[str, Any], width: int) -> list[str]:
    lines = []
    started = step.get("started")
    attempt = number(step.get("attempt")) or 1
    head = f"      attempt {attempt:.0f}: started {shown(started, 40)}" if started else ""
    progress = step.get("progress")
    # The log tail has lines of its own below.
    bar = progress_text({k: v for k, v in progress.items() if k != "log_tail"} if isinstance(progress, dict) else None,
                        max(width - 10, 40))  # fmt: skip
    if head:
        lines.append(head + (", running" if not bar else ""))
    if bar:
        lines.append(f"        {bar}")
    cameras = progress.get("cameras") if isinstance(progress, dict) else None
    if isinstance(cameras, dict):  # encode: one bar per camera
        for name, camera in list(cameras.items())[:CAMERA_LINES]:
            if isinstance(camera, dict):
                frames = {"bytes_done": camera.get("frames_done"), "bytes_total": camera.get("frames_total"),
                          "unit": "frames"}  # fmt: skip
                lines.append(f"        {shown(name, 40)}: {progress_text(frames, max(width - 20, 40))}")
    waiting = step.get("waiting")
    if isinstance(waiting, dict) and waiting.get("for"):
        next_check = shown(waiting.get("next_check_at"), 40)
        lines.append(f"        waiting for {_cap(waiting['for'])}; next check {next_check}")
    tail = progress.get("log_tail") if isinstance(progress, dict) else None
    if isinstance(progress, dict) and isinstance(tail, list) and tail:
        where = " ".join(shown(progress.get(k), 80) for k in ("host", "job") if progress.get(k))
        lines.append(f"        log{f' ({where})' if where else ''}:")
        lines.extend(f"          {shown(line, max(width - 10, 40))}" for line in tail[-LOG_TAIL_LINES:])
    return lines


# ---- --watch ------------------------------------------------------------------------------------------------


def watch(render: Callable[[], str], interval_seconds: float = 1.0, *, is_stream: bool = False) -> None:
    """Redraw `render()` every `interval_seconds` until Ctrl-C (or the reader goes away); returns then.

    `is_stream` (`--json`): no screen clearing; each refresh is printed as it is, one document per line.
    """
    try:
        while True:
            text = render()
            if is_stream:
                print(text, flush=True)
            else:
                print("\033[H\033[2J" + text + f"\n\n(refreshing every {interval_seconds:g}s; Ctrl-C to quit)",
                      flush=True)  # fmt: skip
            time.sleep(interval_seconds)
    except KeyboardInterrupt:
        if not is_stream:
            print(flush=True)
    except BrokenPipeError:
        # `spoold status --watch --json | head -1`: the reader left. Nothing more can be written, not even at exit.
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
