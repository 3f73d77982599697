"""Keeping secrets out of logs, sidecars, health and metrics.

Every secret spoold reads (password files, credentials, keys) is registered
here, and text that leaves the daemon (log records, the error messages kept in
sidecars, health and status output) passes through `redact()`, which masks each
registered secret and the usual shapes of secrets. The secret value becomes
`***`; the key name, URL scheme, user and host are kept so the text stays
readable:

- `KEY=value`, `KEY: value`, `KEY = "quoted value"`, `"KEY": "json value"`,
  `'KEY': b'repr value'` and `\\"KEY\\": \\"json in json\\"`, where KEY *ends* with
  `password`, `passwd`, `passphrase`, `pwd`, `token`, `secret`, `signature`,
  `secret_key`/`secret_access_key`, `private_key`, `api_key`/`apikey` or is
  `X-Amz-Credential`, in any case and after any prefix (`db_password`,
  `SMTP_PASSWORD`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`,
  `access_token`, `refresh_token`, `client_secret`, `X-Amz-Signature`,
  `X-Amz-Security-Token`, `SessionToken`, `userPassword`).
  A key in which the word goes on is not a secret and is left alone:
  `tokenizer=bpe`, `token_count=5`, `tokens_used=3`, `max_tokens: 100`,
  `password_file=/run/pw`, `secretary=bob`. A key that merely ends with the
  word is masked even when its value is harmless (`next_token=abc`,
  `PWD=/home/me`, an item named `token=abc.txt` in a log line): over-masking
  is the safe side.
- `Authorization`, `Proxy-Authorization`, `Cookie` and `Set-Cookie` (any key
  ending with `authorization` or `cookie`): the value up to the end of the
  line, or to its closing quote when quoted.
- `Bearer <token>` anywhere.
- URL userinfo passwords: `scheme://user:***@host/...`; the userinfo ends
  at the last `@` before the first `/` (or space) after `://`, so passwords
  holding `@` or `:` are masked whole (one holding a raw `"` or `\\`, which
  are not URL characters, is not recognised).
- PEM private keys (`-----BEGIN ... PRIVATE KEY-----` ... `-----END ...`,
  PGP `PRIVATE KEY BLOCK` too): the body; without an END line, the body up
  to the next `-----`, quote or the end of the text.

Values: an unquoted value ends at white space, `&` (query strings), a double
quote or a JSON escape such as `\\n`; a quoted value ends at its closing quote
or the end of the line, so `password="correct horse battery"` is masked whole.
When the key itself is quoted (`"token": 5`, `'secret': None`), only a
quoted value is masked. Redacting a JSON document (`redact(json.dumps(doc))`,
as health.json is written) leaves valid JSON: no mask ever swallows a string's
closing quote or half of an escape. One consequence: in plain text, an
unquoted `Authorization:` value holding a double quote (HTTP Digest) is
masked only up to that quote.

`redact()` runs in time linear in the length of its input, whatever the input:
one pass of one compiled pattern for the shapes above (no nested or
overlapping unbounded quantifiers, possessive runs where a run must not be
given back), plus, when secrets are registered, one pass of one compiled
alternation of the known values (longest first), rebuilt only when a new
secret is registered, and skipped when a few `in` tests show none of them is
there (the common case). A registered secret is any value of 4 characters or
more, masked as written and in its JSON-escaped form. `redact(redact(x)) ==
redact(x)`. `bench/redact.py` measures it.
"""

from __future__ import annotations

import json
import logging
import re
import threading

MASK = "***"

_PREFILTER_MAX = 16  # up to this many known forms, `in` tests first: most text holds none, and they cost less

_known: set[str] = set()
_lock = threading.Lock()
_known_pattern: re.Pattern[str] | None = None
_known_forms: tuple[str, ...] = ()

# ---- the shapes of secrets ---------------------------------------------------------------------------------------
# One pattern, matched against the lowercased text (same length, same offsets): every top-level alternative starts
# with a different literal character, so the regex engine skips the characters that cannot start a match without
# entering it, and tries one alternative at those that can (IGNORECASE would disable that: ~10x slower). In every
# match exactly one group takes part, the value to mask, and it is the last group the match closes: the text of the
# match before and after `m.lastindex` is kept.

_NOT_PEM = r"(?!-----begin )"  # a PEM block as a value is left to the PEM alternative, which masks all of it
_QUOTED = (
    r"b?(?:"
    r'"(?![,:}\]])' + _NOT_PEM + r'((?:[^"\\\r\n]++|\\[^\r\n])++)'  # "...": not a JSON string's closing quote
    r"|'" + _NOT_PEM + r"""((?:[^'"\\\r\n]++|\\[^"\r\n])++)"""  # '...'
    r'|\\"' + _NOT_PEM + r'((?:[^"\\\r\n]++|\\[^"\r\n])++)'  # \"...\" inside a JSON string
    r")"
)
_WORD = r"((?:[^\s\"'\\&]|\\[^\s\"nrt])(?:[^\s\"\\&]++|\\[^\s\"nrt])*+)"  # to a space, &, " or a JSON escape
_LINE = r"((?:[^\r\n\"\\]++|\\[^\r\nnr])++)"  # to the end of the line (or of the JSON string)
_SEP = r"[ \t]*+[:=][ \t]*+"
_QUOTED_KEY = r"\\?[\"']" + _SEP + r"(?=b?\\?[\"'])"  # "key": a quoted value only (not 5, null, {...})
_AFTER_KEY = rf"(?:{_QUOTED_KEY}{_QUOTED}|{_SEP}(?:{_QUOTED}|{_NOT_PEM}{_WORD}))"
_AFTER_HEADER = rf"(?:{_QUOTED_KEY}{_QUOTED}|{_SEP}(?:{_QUOTED}|{_LINE}))"
_PEM_LINE = r"[a-z0-9 ]{0,40}private key(?: block)?-----"
_PATTERN = re.compile(
    "|".join((
        rf"p(?:ass(?:word|wd|phrase)|wd|rivate[_-]?key){_AFTER_KEY}",
        rf"s(?:ecret(?:[_-]?(?:access[_-]?)?key)?|ignature){_AFTER_KEY}",
        rf"token{_AFTER_KEY}",
        rf"a(?:pi[_-]?key{_AFTER_KEY}|uthorization{_AFTER_HEADER})",
        rf"x-amz-credential{_AFTER_KEY}",
        rf"cookie{_AFTER_HEADER}",
        r"://[^/\s\"\\:]*+:([^/\s\"\\]+)@",  # userinfo password: backtracks to the last @ before the first /
        rf"-----begin {_PEM_LINE}((?:[^-\"\\]++|\\[^\"]|-(?!----))*+)(?:-----end {_PEM_LINE})?",
        r"bearer(?<![\w]bearer)[ \t]++([a-z0-9._~+/-]++=*+)",
    ))
)  # fmt: skip


def _lowercase(text: str) -> str:
    """`text` lowercased character for character (str.lower turns U+0130 into two characters)."""
    lowered = text.lower()
    if len(lowered) != len(text):
        lowered = text.replace("\u0130", "i").lower()
        if len(lowered) != len(text):  # pragma: no cover - no other such character in Unicode 15
            lowered = "".join(char if len(char.lower()) != 1 else char.lower() for char in text)
    return lowered


def _mask_shapes(text: str) -> str:
    parts: list[str] = []
    append, kept = parts.append, 0
    for match in _PATTERN.finditer(_lowercase(text)):
        start, end = match.span(match.lastindex or 0)
        append(text[kept:start])
        kept = end
    if not parts:
        return text
    append(text[kept:])
    return MASK.join(parts)


# ---- registered secrets ------------------------------------------------------------------------------------------


def register_secret(value: str) -> None:
    """Remember `value` (and its JSON-escaped form) so it is masked wherever it would be written."""
    global _known_pattern, _known_forms  # noqa: PLW0603 - rebuilt here, under the lock, read in redact()
    value = value.strip()
    if len(value) < 4:
        return
    forms = {value, json.dumps(value, ensure_ascii=False)[1:-1]}
    with _lock:
        if forms <= _known:
            return
        _known.update(forms)
        ordered = tuple(sorted(_known, key=lambda secret: (-len(secret), secret)))
        _known_pattern = re.compile("|".join(map(re.escape, ordered)))  # longest first: a secret inside another
        _known_forms = ordered


def _mask_known(text: str, pattern: re.Pattern[str]) -> str:
    parts: list[str] = []
    kept = 0
    for match in pattern.finditer(text):
        start, end = match.span()
        # In JSON text a match right after an odd run of backslashes starts inside an escape (`\n...`): keep the
        # escaped character so the document stays valid. Looking back no further than the previous match keeps
        # this linear.
        before = start
        while before > kept and text[before - 1] == "\\":
            before -= 1
        parts += (text[kept:start], text[start] + MASK if (start - before) % 2 else MASK)
        kept = end
    if not parts:
        return text
    parts.append(text[kept:])
    return "".join(parts)


def redact(text: str) -> str:
    """`text` with every registered secret and every secret-shaped substring masked."""
    with _lock:
        known, forms = _known_pattern, _known_forms
    if known is not None and (len(forms) > _PREFILTER_MAX or any(form in text for form in forms)):
        text = _mask_known(text, known)
    return _mask_shapes(text)


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record's message once, redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.msg, record.args = redact(message), None
        return True
