"""Text for `spoold status`: values made safe to print, sizes, durations and progress lines.

What a sidecar holds is mostly a producer's: item names are any bytes (a name that is not UTF-8 arrives as
surrogate-escaped text), fields and error messages quote what producers and remote servers sent. So every
value printed goes through `shown()`, which makes control characters, bidi overrides and lone surrogates
visible (`\\x1b`, `\\u202e`, `\\xff`) and caps long values; a terminal never receives an escape sequence from
an item. Numbers are read with `number()`, so a sidecar holding `"bytes_done": "lots"` shows nothing, not a crash.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# C0, DEL, C1, the bidi marks, embeddings, overrides and isolates, line and paragraph separators, surrogates:
# each could move the cursor, retitle the window, reorder what is shown or break the line of a terminal.
_UNSAFE = re.compile(r"([\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff])")
_SHORT_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}
BAR_MIN, BAR_MAX = 10, 30
# What `file 2/14 NAME` gets at least, the bar shrinking first.
FILE_ROOM = 30


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


def _escape(char: str) -> str:
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape: show the byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def number(value: object) -> float | None:
    """A JSON number as a float; None for anything else (booleans, strings, NaN, infinities)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    as_float = float(value)
    return as_float if math.isfinite(as_float) else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_seconds(seconds: float) -> str:
    """`0.25 s`, `3.2 s`, `4m 05s`, `2h 03m`."""
    if seconds < 10:
        return f"{seconds:.2g} s" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def files_text(progress: dict[str, Any], room: int) -> str:
    """`file 2/14 NAME` for a request of several files: the file being moved now, of how many."""
    total = number(progress.get("files_total"))
    if total is None or total < 1:
        return ""
    done = number(progress.get("files_done")) or 0.0
    current = int(min(max(done + 1, 1), total))
    name = progress.get("file")
    text = f"file {current}/{total:.0f}"
    return f"{text} {shown(name, max(room - len(text) - 1, 12))}" if isinstance(name, str) and name else text


def progress_text(progress: object, room: int) -> str:
    """One line for a step's progress: a bar with percentage, rate and ETA when the total is known, else
    what is done so far and the rate; then `file 2/14 NAME`; for a remote job only reporting its log, its
    last line. Empty when there is nothing to show. The bar takes what room the rest leaves."""
    if not isinstance(progress, dict):
        return ""
    total, done = number(progress.get("bytes_total")), number(progress.get("bytes_done"))
    unit = progress.get("unit", "bytes")
    is_bytes = unit == "bytes"
    has_total = done is not None and total is not None and total > 0
    parts: list[str] = []
    if has_total and done is not None and total is not None:
        parts.append(f"{min(max(done / total, 0.0), 1.0) * 100:5.1f}%")
        if not is_bytes:
            parts.append(f"{done:.0f}/{total:.0f} {shown(unit, 20)}")
    elif done is not None and (done > 0 or total is None):
        parts.append(human_bytes(done) if is_bytes else f"{done:.0f} {shown(unit, 20)}")
    rate, eta = number(progress.get("rate_bps")), number(progress.get("eta_s"))
    if parts and rate is not None and rate > 0 and is_bytes:
        parts.append(f"{human_bytes(rate)}/s")
    if has_total and eta is not None and eta >= 0:
        parts.append(f"eta {human_seconds(eta)}")
    text = " ".join(parts)
    if has_total and done is not None and total is not None:
        bar_width = max(BAR_MIN, min(BAR_MAX, room - len(text) - FILE_ROOM))
        filled = int(min(max(done / total, 0.0), 1.0) * bar_width)
        text = f"[{'#' * filled}{'.' * (bar_width - filled)}] {text}"
    if files := files_text(progress, max(room - len(text) - 1, FILE_ROOM)):
        text = f"{text} {files}" if text else files
    if not text:
        tail = progress.get("log_tail")
        if isinstance(tail, list) and tail:
            text = f"log: {shown(tail[-1], max(room - 5, 20))}"
    return text


def gather_text(gather: dict[str, Any], room: int, *, is_full: bool = False) -> str:
    """A member of a `gather:` queue: who its group still misses, or which group item it went into."""
    if gather.get("item"):
        return shown(f"in group item {gather['item']} (group {gather.get('group')})", max(room, 20))
    missing = gather.get("missing")
    names = ", ".join(str(m) for m in missing) if isinstance(missing, list) else "?"
    until = f", until {gather.get('deadline')}" if is_full else ""
    return shown(f"missing {names} (group {gather.get('group')}{until})", max(room, 20))
