"""Reading sidecars for `spoold status`: tables, progress bars and JSON."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from spoold.fsio import read_json

ACTIVE = ("running", "waiting", "retrying", "queued")


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
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _brief(document: dict[str, Any]) -> dict[str, Any]:
    step = _current_step(document)
    return {
        "item": document.get("item"),
        "state": document.get("state"),
        "step": document.get("step"),
        "progress": step.get("progress") if step else None,
        "updated": document.get("updated"),
        "error": (document.get("error") or {}).get("message"),
        "arriving": bool(document.get("arriving")),
    }


def _current_step(document: dict[str, Any]) -> dict[str, Any] | None:
    for step in document.get("steps", []):
        if step.get("state") in ("running", "retrying", "interrupted"):
            return dict(step)
    return None


def render_table(data: dict[str, Any], *, is_all: bool, width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((100, 20)).columns
    daemon = data["daemon"]
    if daemon["running"]:
        head = f"spool {data['spool']}: daemon running (pid {daemon['pid']}), {daemon.get('status') or ''}"
    else:
        head = f"spool {data['spool']}: daemon not running"
    lines = [head]
    for queue, info in data["queues"].items():
        counts = ", ".join(f"{n} {s}" for s, n in sorted(info["counts"].items())) or "empty"
        lines.append(f"\n{queue}: {counts}")
        items = [i for i in info["items"] if is_all or i["state"] in ACTIVE or i["state"] == "failed"]
        if not items:
            continue
        lines.append(f"  {'ITEM':<32} {'STATE':<9} {'STEP':<10} PROGRESS")
        for item in items[-200:]:
            lines.append(f"  {_cut(str(item['item']), 32):<32} {item['state']:<9} {item['step'] or '-'!s:<10} "
                         f"{_progress_text(item, width - 56)}")  # fmt: skip
    return "\n".join(lines)


def _progress_text(item: dict[str, Any], room: int) -> str:
    if item["state"] == "failed":
        return _cut(str(item.get("error") or ""), max(room, 20))
    progress = item.get("progress") or {}
    total, done = progress.get("bytes_total"), progress.get("bytes_done")
    if item.get("arriving"):
        return f"{done or 0} of {total or 0} {progress.get('unit', 'bytes')} so far; the bundle is still arriving"
    if not total or done is None:
        return ""
    fraction = min(max(done / total, 0.0), 1.0)
    bar_width = max(10, min(30, room - 30))
    filled = int(fraction * bar_width)
    rate = progress.get("rate_bps")
    rate_text = f" {_human(rate)}/s" if rate else ""
    eta = progress.get("eta_s")
    eta_text = f" eta {eta:.0f}s" if isinstance(eta, (int, float)) else ""
    return f"[{'#' * filled}{'.' * (bar_width - filled)}] {fraction * 100:5.1f}%{rate_text}{eta_text}"


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: max(n - 1, 1)] + "…"


def render_item(document: dict[str, Any]) -> str:
    lines = [f"{document['queue']}/{document['item']}: {document['state']}"
             + (f" at {document['step']}" if document.get("step") else "")]  # fmt: skip
    if document.get("original_name") != document.get("item"):
        lines.append(f"  dropped as: {document.get('original_name')}")
    if document.get("arriving"):
        lines.append("  still arriving: the first step runs while the bundle is written; waiting for its marker")
    if document.get("fields"):
        lines.append(f"  fields: {json.dumps(document['fields'], ensure_ascii=False)}")
    for step in document.get("steps", []):
        detail = step.get("state", "")
        if step.get("attempt", 1) > 1:
            detail += f" (attempt {step['attempt']})"
        if step.get("error"):
            detail += f": {step['error'].get('message')}"
        lines.append(f"  - {step.get('name'):<10} {detail}")
    if document.get("error"):
        lines.append(f"  error: {document['error'].get('message')}")
    if document.get("next_attempt_at"):
        lines.append(f"  next attempt at {document['next_attempt_at']}")
    return "\n".join(lines)


def watch(render: Any, interval_seconds: float = 1.0) -> None:
    """Redraw `render()` until interrupted."""
    while True:
        text = render()
        print("\033[H\033[2J" + text + f"\n\n(refreshing every {interval_seconds:g}s; Ctrl-C to quit)", flush=True)
        time.sleep(interval_seconds)
