"""The far-host half of `exec` (`remote:`): command lines that no field can widen, and detached jobs.

A command line for the far side's login shell is built from words that are each
shell-quoted after templating, and the program's argv reaches it as positional
parameters of `sh -c`, never re-parsed: a field holding spaces, quotes, `;`,
`$()` or a newline stays one word.

Detached jobs (`detach: true`) need only a POSIX shell on the far host. The
job's folder `~/.spoold/jobs/<id>/` is created with `mkdir`, which succeeds
once: whoever creates it starts the job, and every later call (a reconnect, a
restarted daemon) only attaches to it, so a job never starts twice. The job
runs under `setsid` where the host has it (its own session and process group,
so `timeout` ends the whole tree), else in the background with SIGHUP ignored;
its runner writes `pid` first and `status` (the exit code) last, each by a
rename, and its stdout and stderr go to `log`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import secrets
import shlex
import time
from collections.abc import Mapping, Sequence
from typing import Any

from spoold.errors import CommandTimedOut, TransientError
from spoold.handlers.base import StepContext
from spoold.redact import redact
from spoold.transports.base import CommandResult, Transport, parse_url, redact_url

JOBS_FOLDER = ".spoold/jobs"
LOG_TAIL_LINES = 20
LOG_LINE_CHARS = 500
JOB_ID = re.compile(r"^[0-9a-f]{32}$")
# A foreground command with no `timeout` still ends: a day is longer than any sane foreground step.
FOREGROUND_TIMEOUT = 86400.0
# Starting, polling or signalling a job is quick; longer means the link is wedged.
COMMAND_SECONDS = 60.0
FIRST_POLL_SECONDS = 0.5
LAST_POLL_SECONDS = 5.0
# A job folder without a pid this long after it was first seen: its start died before the job ran.
START_SECONDS = 60.0
KILL_GRACE_SECONDS = 10.0

# $1 = job folder, $2 = cwd ("" = home), then NAME=VALUE words, then "--", then the argv.
_RUNNER = r"""
d=$1; cwd=$2; shift 2
echo $$ >"$d/pid.tmp" && mv -f "$d/pid.tmp" "$d/pid"
trap '' HUP
finish() { echo "$1" >"$d/status.tmp" && mv -f "$d/status.tmp" "$d/status"; exit 0; }
if [ -n "$cwd" ]; then cd -- "$cwd" || finish 126; fi
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do export "$1" || finish 126; shift; done
shift
"$@" </dev/null &
child=$!
trap 'kill -TERM "$child" 2>/dev/null' TERM
while :; do
  wait "$child"; code=$?
  kill -0 "$child" 2>/dev/null || break
done
finish "$code"
"""

# $1 = cwd, then NAME=VALUE words, "--" and the argv. The program ends when the connection does: stdin reaching
# EOF (the channel closed: a timeout, a stop, a cut link, a killed daemon) TERMs it, so none is left behind.
_FOREGROUND = r"""
cwd=$1; shift
if [ -n "$cwd" ]; then cd -- "$cwd" || exit 126; fi
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do export "$1" || exit 126; shift; done
shift
exec 3<&0
"$@" </dev/null 3<&- &
child=$!
# An asynchronous list reads /dev/null unless told otherwise: the watcher reads the channel through fd 3.
{ cat <&3 >/dev/null; kill -TERM "$child" 2>/dev/null; } &
watcher=$!
wait "$child"; code=$?
kill "$watcher" 2>/dev/null
exit "$code"
"""

# $1 = job id, then the runner's arguments after its job folder.
_LAUNCHER = r"""
id=$1; shift
umask 077
mkdir -p "$HOME/JOBS" || exit 70
d="$HOME/JOBS/$id"
if ! mkdir "$d" 2>/dev/null; then echo spoold-job-attached; exit 0; fi
if command -v setsid >/dev/null 2>&1; then
  setsid sh -c "$0" spoold-job "$d" "$@" </dev/null >>"$d/log" 2>&1 &
else
  nohup sh -c "$0" spoold-job "$d" "$@" </dev/null >>"$d/log" 2>&1 &
fi
echo spoold-job-started
""".replace("JOBS", JOBS_FOLDER)

# $1 = job id. The first line says where the job is; the log's last lines follow.
_POLL = r"""
d="$HOME/JOBS/$1"
if [ -f "$d/status" ]; then echo "status $(cat "$d/status")"
elif [ ! -d "$d" ]; then echo missing
elif [ ! -f "$d/pid" ]; then echo starting
elif kill -0 "$(cat "$d/pid")" 2>/dev/null; then echo running
else echo lost
fi
tail -n TAIL "$d/log" 2>/dev/null
exit 0
""".replace("JOBS", JOBS_FOLDER).replace("TAIL", str(LOG_TAIL_LINES))

# $1 = job id, $2 = signal. The runner leads its own process group when setsid made it, so the group goes.
_SIGNAL = r"""
d="$HOME/JOBS/$1"
[ -f "$d/pid" ] || exit 0
pid=$(cat "$d/pid")
kill -"$2" -"$pid" 2>/dev/null || kill -"$2" "$pid" 2>/dev/null
exit 0
""".replace("JOBS", JOBS_FOLDER)


@dataclasses.dataclass(frozen=True)
class JobState:
    """One poll of a detached job: `phase` is starting, running, done, missing or lost."""

    phase: str
    exit_code: int | None
    log_tail: list[str]


def _line(*words: str) -> str:
    return " ".join(shlex.quote(word) for word in words)


def _environment_words(env: Mapping[str, str]) -> list[str]:
    return [f"{name}={value}" for name, value in env.items()]


def command_line(argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """A command line that runs `argv` in `cwd` with `env` added; one word per element, whatever it holds."""
    return _line("sh", "-c", _FOREGROUND, "spoold-exec", cwd or "", *_environment_words(env), "--", *argv)


def start_line(job_id: str, argv: Sequence[str], env: Mapping[str, str], cwd: str | None) -> str:
    """Start job `job_id` unless it was started before (then only say so)."""
    return _line("sh", "-c", _LAUNCHER, _RUNNER, job_id, cwd or "", *_environment_words(env), "--", *argv)


def poll_line(job_id: str) -> str:
    return _line("sh", "-c", _POLL, "spoold-poll", job_id)


def signal_line(job_id: str, signal: str) -> str:
    return _line("sh", "-c", _SIGNAL, "spoold-signal", job_id, signal)


def parse_poll(output: str) -> JobState:
    """Read what `poll_line` printed."""
    lines = output.splitlines()
    head = lines[0].split() if lines else []
    tail = lines[1:][-LOG_TAIL_LINES:]
    if len(head) == 2 and head[0] == "status" and re.fullmatch(r"-?[0-9]{1,6}", head[1]):
        return JobState("done", int(head[1]), tail)
    if len(head) == 1 and head[0] in ("missing", "starting", "running", "lost"):
        return JobState(head[0], None, tail)
    return JobState("unknown", None, tail)


def check_remote(remote: str) -> None:
    """Config-time check of `exec`'s `remote:` (after `remotes:` names were resolved): an SSH host, no path."""
    scheme, sep, rest = remote.partition("://")
    if not sep:
        raise ValueError(f"remote: {remote!r} is neither ssh://user@host[:port] nor the name of a remote in remotes:")
    if scheme.lower() not in ("ssh", "sftp"):
        raise ValueError(f"remote: {redact_url(remote)!r} must be an ssh:// URL (a host reached over SSH)")
    authority, _, path = rest.partition("/")
    if ":" in authority.split("@")[0] and "@" in authority:
        raise ValueError("remote: never put a password in the URL; use password_file or credential")
    if path:
        raise ValueError(f"remote: {redact_url(remote)!r} names a path; a remote is a host (use cwd: for a folder)")


class RemoteJob:
    """One `exec` step's program on the far host, run in the foreground or detached."""

    def __init__(
        self,
        ctx: StepContext,
        *,
        url: str,
        settings: Mapping[str, Any],
        argv: Sequence[str],
        env: Mapping[str, str],
        cwd: str | None,
        timeout: float | None,
    ) -> None:
        self.ctx = ctx
        self.url, self.settings = url, settings
        self.host = parse_url(url).host
        self.argv, self.env, self.cwd, self.timeout = list(argv), dict(env), cwd, timeout

    def _command(self, line: str, timeout: float) -> CommandResult:
        transport: Transport = self.ctx.transport(self.url, self.settings)
        return transport.run_command(line, timeout=timeout, check_stop=self.ctx.check_stop)

    def run(self) -> tuple[int, str, str]:
        """Run the program and wait; it ends with the connection (a stop, a timeout, a cut link)."""
        timeout = self.timeout if self.timeout is not None else FOREGROUND_TIMEOUT
        try:
            result = self._command(command_line(self.argv, self.env, self.cwd), timeout)
        except CommandTimedOut:
            raise TransientError(f"{self.argv[0]} on {self.host} timed out after {timeout:g}s") from None
        return result.status, result.stdout, result.stderr

    def run_detached(self) -> tuple[int, str, str]:
        """Start the job once (its id is durable before it starts), then wait for its exit status."""
        data = self.ctx.checkpoint.data
        job_id = data.get("job_id")
        if not isinstance(job_id, str) or not JOB_ID.match(job_id):
            job_id = secrets.token_hex(16)
            data.update(job_id=job_id, started_at=time.time())
            self.ctx.checkpoint.save()
        started = float(data.get("started_at") or time.time())
        deadline = started + self.timeout if self.timeout is not None else None
        is_started, delay, starting_since = False, FIRST_POLL_SECONDS, None
        shown_tail: list[str] | None = None
        while True:
            self.ctx.check_stop()
            try:
                if not is_started:
                    self._command(start_line(job_id, self.argv, self.env, self.cwd), COMMAND_SECONDS)
                    is_started = True
                state = parse_poll(self._command(poll_line(job_id), COMMAND_SECONDS).stdout)
            except TransientError as exc:
                self.ctx.log.warning("remote job %s on %s: %s; reconnecting", job_id, self.host, exc)
                self.ctx.waiting(f"reconnecting to {self.host} (job {job_id} goes on there): {exc}", delay)
                state = None
            if state is not None:
                tail = [redact(line)[-LOG_LINE_CHARS:] for line in state.log_tail]
                if tail != shown_tail:
                    shown_tail = tail
                    self.ctx.progress(0, 0, log_tail=tail, job=job_id, host=self.host)
                if state.phase == "done" and state.exit_code is not None:
                    if state.exit_code != 0:
                        self._forget(data)  # a retry (exit 75, or `spoold retry`) starts a new job
                    return state.exit_code, "\n".join(state.log_tail), ""
                if state.phase == "missing":
                    is_started = False  # recorded, but the start never reached the host: start it now
                starting_since = (starting_since or time.monotonic()) if state.phase == "starting" else None
                if state.phase == "lost" or (starting_since and time.monotonic() - starting_since > START_SECONDS):
                    self._forget(data)
                    raise TransientError(f"remote job {job_id} on {self.host} ended without an exit status "
                                         "(killed, or the host restarted); it will be started again")  # fmt: skip
            if deadline is not None and time.time() > deadline:
                self._end(job_id)
                self._forget(data)
                raise TransientError(f"{self.argv[0]} on {self.host} timed out after {self.timeout:g}s; the job "
                                     "was stopped")  # fmt: skip
            self.ctx.sleep(delay if deadline is None else max(min(delay, deadline - time.time()), 0.0))
            delay = min(delay * 2, LAST_POLL_SECONDS)

    def _forget(self, data: dict[str, Any]) -> None:
        data.pop("job_id", None)
        data.pop("started_at", None)
        self.ctx.checkpoint.save()

    def _end(self, job_id: str) -> None:
        """TERM the job's process group, then KILL what is left after a grace period."""
        with contextlib.suppress(TransientError):
            self._command(signal_line(job_id, "TERM"), COMMAND_SECONDS)
            grace = time.monotonic() + KILL_GRACE_SECONDS
            while time.monotonic() < grace:
                if parse_poll(self._command(poll_line(job_id), COMMAND_SECONDS).stdout).phase != "running":
                    return
                self.ctx.sleep(0.5)
            self._command(signal_line(job_id, "KILL"), COMMAND_SECONDS)
