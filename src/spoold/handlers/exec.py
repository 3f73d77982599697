"""exec: run a program (an argv list, never a shell string) on the item.

Options: `argv` (list of templates: `{path}` is the payload, `{item_dir}` the
item's folder, plus every field), `timeout`, `env` (variables for the program),
`capture_fields` (a JSON object on the last line of stdout is merged into the
item's fields), `allow_dash_values`. Exit 0 is success, 75 (EX_TEMPFAIL) means
try again later, anything else fails the item. Output goes to the log. The
program runs in the item's work folder with SPOOLD_QUEUE, SPOOLD_ITEM,
SPOOLD_ITEM_DIR and SPOOLD_PAYLOAD set. A re-run after a crash runs it again:
make it idempotent.

The program gets a clean environment, never the daemon's (which may hold
`AWS_SECRET_ACCESS_KEY`, `CREDENTIALS_DIRECTORY`, ...): `PATH` (the daemon's,
else a safe default), `HOME` of the daemon's user, `LANG` (the daemon's, else
`C.UTF-8`), `LC_ALL` and `TZ` when the daemon has them, the SPOOLD_* variables,
and exactly what the step's `env` names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pwd
import re
import signal
import subprocess
import tempfile
import time
from typing import Any

from spoold.children import dying_with_daemon
from spoold.errors import Interrupted, PermanentError, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.handlers.remote_exec import RemoteJob, check_remote
from spoold.options import Seconds
from spoold.templates import BUILTIN_NAMES, render_arg, render_text, render_url, shadowed_builtins, template_fields
from spoold.transports.base import ConnectionOptions

EX_TEMPFAIL = 75
OUTPUT_TAIL_BYTES = 4000
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_LANG = "C.UTF-8"
# Passed on from the daemon's environment when set: locale and time zone, nothing that can hold a secret.
INHERITED = ("LC_ALL", "TZ")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# An `env` value that is exactly `$NAME` passes the daemon's variable NAME on (`$$...` is a literal `$...`).
_IMPORT = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
_BRACED_IMPORT = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}$")


@dataclasses.dataclass(frozen=True)
class ExecOptions(ConnectionOptions):
    """The `exec` step's options.

    `argv`: the program and its arguments, each a template (no shell ever sees them). An element
    whose first character would come from a field's value and is `-` (an item named `--help`) is
    refused, so no producer can add an option; `-o{name}` or `--` written in the config are fine.
    `allow_dash_values`: true lets such values through, for a program that takes them as data.
    `env`: NAME -> value for the program's environment, on top of the clean one (PATH, HOME, LANG,
    LC_ALL, TZ, SPOOLD_*). A value is a template (`'{name}'`), or exactly `$NAME` to pass on the
    daemon's own variable NAME (`AWS_PROFILE: $AWS_PROFILE`; the item fails if the daemon lacks
    it); `$$x` is the literal text `$x`. Nothing else of the daemon's environment reaches the child.
    `timeout`: kill the program after this long (retried later). `capture_fields`: merge the JSON
    object on stdout's last line into the item's fields.
    """

    argv: list[str]
    timeout: Seconds | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    capture_fields: bool = False
    allow_dash_values: bool = False
    remote: str | None = None
    cwd: str | None = None
    detach: bool = False

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must name a program")
        if self.remote is not None:
            check_remote(self.remote)
        elif self.detach:
            raise ValueError("detach: true needs remote: (a job on another host that outlives the connection)")
        chosen_by_fields = [f for f in template_fields(self.argv[0]) if f not in BUILTIN_NAMES]
        if chosen_by_fields:
            raise ValueError(f"argv[0] uses field {chosen_by_fields[0]!r}: the program to run is the config's to "
                             "choose, never a field's (built-ins like {item_dir} are fine)")  # fmt: skip
        bad = [name for name in self.env if not _ENV_NAME.match(name)]
        if bad:
            raise ValueError(f"env: {bad[0]!r} is not a variable name (letters, digits and _, not first a digit)")
        for name, value in self.env.items():
            braced = _BRACED_IMPORT.match(value)
            if braced:
                raise ValueError(f"env: {name}: write ${braced.group(1)} to pass the daemon's variable on "
                                 "(braces are templates here)")  # fmt: skip


class Exec(Handler[ExecOptions]):
    name = "exec"
    Options = ExecOptions
    url_options = ("remote",)

    def run(self, ctx: StepContext) -> StepResult:
        values = ctx.template_values()
        dash = self.options.allow_dash_values
        argv = [render_arg(arg, values, allow_leading_dash=dash) for arg in self.options.argv]
        step_env = {name: _env_value(name, value, values) for name, value in self.options.env.items()}
        if self.options.remote is not None:
            code, stdout, stderr = self._run_remote(ctx, argv, {**step_env, **_item_env(ctx)})
            return finish(ctx, argv[0], code, stdout, stderr, self.options.capture_fields)
        env = {**child_environment(), **step_env, **_item_env(ctx), "SPOOLD_ITEM_DIR": str(ctx.item_dir),
               "SPOOLD_PAYLOAD": ":".join(str(p) for p in ctx.payload)}  # fmt: skip
        cwd = ctx.item_dir / ctx.render(self.options.cwd) if self.options.cwd else ctx.item_dir
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                process = subprocess.Popen(dying_with_daemon(argv, env.get("PATH"), cwd), cwd=cwd, env=env,
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                           start_new_session=True)  # fmt: skip
            except OSError as exc:
                raise PermanentError(f"cannot run {argv[0]}: {exc.strerror}") from None
            code = self._wait(ctx, process, argv[0])
            stdout, stderr = _read(out), _read(err)
        return finish(ctx, argv[0], code, stdout, stderr, self.options.capture_fields)

    def _run_remote(self, ctx: StepContext, argv: list[str], env: dict[str, str]) -> tuple[int, str, str]:
        options = self.options
        job = RemoteJob(
            ctx,
            url=render_url(options.remote or "", ctx.template_values()),
            settings=options.connection_settings(),
            argv=argv,
            env=env,
            cwd=ctx.render(options.cwd) if options.cwd else None,
            timeout=options.timeout,
        )
        return job.run_detached() if options.detach else job.run()

    def _wait(self, ctx: StepContext, process: subprocess.Popen[bytes], program: str) -> int:
        deadline = time.monotonic() + self.options.timeout if self.options.timeout is not None else None
        while True:
            try:
                return process.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            try:
                ctx.check_stop()
            except Interrupted:
                _kill(process)
                raise
            if deadline is not None and time.monotonic() > deadline:
                _kill(process)
                raise TransientError(f"{program} timed out after {self.options.timeout:g}s")


def finish(ctx: StepContext, program: str, code: int, stdout: str, stderr: str, capture: bool) -> StepResult:
    """The step's end, the same for a local and a remote program: 0 is done, 75 is try again later, else failed."""
    for line in (stdout + stderr).splitlines()[-50:]:
        ctx.log.info("%s: %s", os.path.basename(program), line)
    if code == EX_TEMPFAIL:
        raise TransientError(f"{program} asked to be retried later (exit 75): {_tail(stderr)}")
    if code != 0:
        raise PermanentError(f"{program} exited with {_describe(code)}: {_tail(stderr) or _tail(stdout)}")
    fields = captured_fields(stdout) if capture else {}
    return StepResult(result={"exit_code": 0, "fields": sorted(fields)}, fields=fields)


def captured_fields(stdout: str) -> dict[str, Any]:
    lines = [line for line in stdout.strip().splitlines() if line.strip()]
    if not lines:
        raise PermanentError("capture_fields: the program printed nothing; expected a JSON object last")
    try:
        value = json.loads(lines[-1])
    except ValueError:
        raise PermanentError(f"capture_fields: the last line of output is not JSON: {lines[-1][:200]!r}") from None
    if not isinstance(value, dict):
        raise PermanentError("capture_fields: the last line of output must be a JSON object")
    shadowing = shadowed_builtins(value)
    if shadowing:
        raise PermanentError(f"capture_fields: the program printed {', '.join(map(repr, shadowing))}, which "
                             "name built-in template values; a field may not shadow a built-in")  # fmt: skip
    return value


def _item_env(ctx: StepContext) -> dict[str, str]:
    return {"SPOOLD_QUEUE": ctx.queue, "SPOOLD_ITEM": ctx.item}


def child_environment() -> dict[str, str]:
    """The clean base environment of every program `exec` runs (the step's `env` is added to it)."""
    env = {"PATH": os.environ.get("PATH") or SAFE_PATH, "HOME": _home(), "LANG": os.environ.get("LANG") or DEFAULT_LANG}
    env.update({name: os.environ[name] for name in INHERITED if os.environ.get(name)})
    return env


def _home() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_dir or "/"
    except KeyError:  # a uid with no passwd entry (some containers)
        return "/"


def _env_value(name: str, template: str, values: dict[str, Any]) -> str:
    imported = _IMPORT.match(template)
    if imported:
        value = os.environ.get(imported.group(1))
        if value is None:
            raise PermanentError(f"env {name}: the daemon's environment has no ${imported.group(1)} to pass on")
        return value
    if template.startswith("$$"):
        return "$" + render_text(template[2:], values)
    return render_text(template, values)


def _kill(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _read(stream: Any) -> str:
    stream.seek(0)
    return str(stream.read().decode(errors="replace"))


def _tail(text: str) -> str:
    text = text.strip()
    return text[-OUTPUT_TAIL_BYTES:] if text else ""


def _describe(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"
