"""Reading sidecars for `spoold status`: tables, progress bars and JSON.

What a sidecar holds is mostly a producer's: item names are any bytes (a name that is not UTF-8 arrives as
surrogate-escaped text), fields and error messages quote what producers and remote servers sent. So every
value printed here goes through `shown()`, which makes control characters, bidi overrides and lone
surrogates visible (`\x1b`, `\u202e`, `\xff`) and caps long values; a terminal never receives an escape
sequence from an item. `--json` prints the full values, as JSON with every such character escaped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from spoold.fsio import read_json

ACTIVE = ("running", "waiting", "retrying", "queued")
# C0, DEL, C1, the bidi marks, embeddings, overrides and isolates, line and paragraph separators, surrogates:
# each could move the cursor, retitle the window, reorder what is shown or break the line of a terminal.
_UNSAFE = re.compile(r"([\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff])")
# Long enough for any real name, step or message; anything longer is a producer's and --json has it whole.
ITEM_VALUE_CHARS = 2000
STATE_CHARS = 20


def shown(value: object, limit: int | None = None) -> str:
    """`value` as text that is safe to print, at most `limit` characters (cut with "…")."""
    text = value if isinstance(value, str) else _as_text(value)
    pieces = _UNSAFE.split(text if limit is None else text[: limit + 1])
    # split() with one group alternates: plain text, one unsafe character, plain text, ...
    for index in range(1, len(pieces), 2):
        pieces[index] = _escape(pieces[index])
    whole = "".join(pieces)
    if limit is None or len(whole) <= limit:
        return whole
    kept, room = [], max(limit - 1, 0)
    for index, piece in enumerate(pieces):
        if len(piece) > room:
            if index % 2 == 0:  # plain text may be cut anywhere, an escape only whole
                kept.append(piece[:room])
            break
        kept.append(piece)
        room -= len(piece)
    return "".join(kept) + "…"


def _as_text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape: show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def load_sidecars(spool: Path, queue: str) -> list[dict[str, Any]]:
    status = spool / queue / "status"
    try:
        names = sorted(os.listdir(status))
    except FileNotFoundError:
        return []
    documents = []
    for name in names:
        if name.endswith(".json") and not name.startswith("."):
            document = read_json(status / name)
            if document is not None and document.get("schema") == "spoold.status/1":
                documents.append(document)
    return documents


def summary(spool: Path, queues: list[str]) -> dict[str, Any]:
    health = read_json(spool / "health.json")
    result: dict[str, Any] = {"spool": str(spool), "daemon": _daemon_state(health), "queues": {}}
    for queue in queues:
        documents = load_sidecars(spool, queue)
        counts: dict[str, int] = {}
        for document in documents:
            counts[str(document.get("state"))] = counts.get(str(document.get("state")), 0) + 1
        result["queues"][queue] = {"counts": counts, "items": [_brief(d) for d in documents]}
    return result


def _daemon_state(health: dict[str, Any] | None) -> dict[str, Any]:
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


def _brief(document: dict[str, Any]) -> dict[str, Any]:
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
        items = [i for i in info["items"] if is_all or i["state"] in ACTIVE or i["state"] == "failed"]
        if not items:
            continue
        lines.append(f"  {'ITEM':<32} {'STATE':<9} {'STEP':<10} PROGRESS")
        for item in items[-200:]:
            lines.append(f"  {shown(item['item'], 32):<32} {shown(item['state'], STATE_CHARS):<9} "
                         f"{shown(item['step'] or '-', 16):<10} {_progress_text(item, width - 56)}")  # fmt: skip
    return "\n".join(lines)


def _progress_text(item: dict[str, Any], room: int) -> str:
    if item["state"] == "failed":
        return shown(item.get("error"), max(room, 20))
    progress = item.get("progress")
    progress = progress if isinstance(progress, dict) else {}
    total, done = _number(progress.get("bytes_total")), _number(progress.get("bytes_done"))
    if item["state"] == "waiting" and item.get("gather"):
        return _gather_text(item["gather"], room)
    if item.get("arriving"):
        unit = shown(progress.get("unit", "bytes"), 20)
        return f"{done or 0:.0f} of {total or 0:.0f} {unit} so far; the bundle is still arriving"
    if not total or done is None:
        return ""
    fraction = min(max(done / total, 0.0), 1.0)
    bar_width = max(10, min(30, room - 30))
    filled = int(fraction * bar_width)
    rate = _number(progress.get("rate_bps"))
    rate_text = f" {_human(rate)}/s" if rate else ""
    eta = _number(progress.get("eta_s"))
    eta_text = f" eta {eta:.0f}s" if eta is not None else ""
    return f"[{'#' * filled}{'.' * (bar_width - filled)}] {fraction * 100:5.1f}%{rate_text}{eta_text}"


def _gather_text(gather: dict[str, Any], room: int, *, is_full: bool = False) -> str:
    """A member of a `gather:` queue: who its group still misses, or which group item it went into."""
    if gather.get("item"):
        return shown(f"in group item {gather['item']} (group {gather.get('group')})", max(room, 20))
    missing = gather.get("missing")
    names = ", ".join(str(m) for m in missing) if isinstance(missing, list) else "?"
    until = f", until {gather.get('deadline')}" if is_full else ""
    return shown(f"missing {names} (group {gather.get('group')}{until})", max(room, 20))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def render_item(document: dict[str, Any]) -> str:
    def cap(value: object) -> str:
        return shown(value, ITEM_VALUE_CHARS)

    lines = [f"{cap(document.get('queue'))}/{cap(document.get('item'))}: {cap(document.get('state'))}"
             + (f" at {cap(document['step'])}" if document.get("step") else "")]  # fmt: skip
    if document.get("original_name") != document.get("item"):
        lines.append(f"  dropped as: {cap(document.get('original_name'))}")
    if isinstance(document.get("gather"), dict):
        lines.append(f"  gather: {cap(_gather_text(document['gather'], ITEM_VALUE_CHARS, is_full=True))}")
    if document.get("arriving"):
        lines.append("  still arriving: the first step runs while the bundle is written; waiting for its marker")
    if document.get("fields"):
        lines.append(f"  fields: {cap(document['fields'])}")
    for step in _steps(document):
        detail = cap(step.get("state", ""))
        attempt = _number(step.get("attempt"))
        if attempt is not None and attempt > 1:
            detail += f" (attempt {attempt:.0f})"
        if step.get("error"):
            detail += f": {cap(_message(step['error']))}"
        elif step.get("state") == "skipped" and step.get("skipped"):
            # The reason names the `when:` condition that did not hold, so "why did it not ship?" is answered here.
            detail += f": {cap(step['skipped'])}"
        lines.append(f"  - {cap(step.get('name')):<10} {detail}")
    if document.get("error"):
        lines.append(f"  error: {cap(_message(document['error']))}")
    if document.get("next_attempt_at"):
        lines.append(f"  next attempt at {cap(document['next_attempt_at'])}")
    return "\n".join(lines)


def watch(render: Any, interval_seconds: float = 1.0) -> None:
    """Redraw `render()` until interrupted."""
    while True:
        text = render()
        print("\033[H\033[2J" + text + f"\n\n(refreshing every {interval_seconds:g}s; Ctrl-C to quit)", flush=True)
        time.sleep(interval_seconds)
