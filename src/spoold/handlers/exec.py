"""exec: run a program (an argv list, never a shell string) on the item.

Options: `argv` (list of templates: `{path}` is the payload, `{item_dir}` the
item's folder, plus every field), `timeout`, `env` (extra variables),
`capture_fields` (a JSON object on the last line of stdout is merged into the
item's fields). Exit 0 is success, 75 (EX_TEMPFAIL) means try again later,
anything else fails the item. Output goes to the log. The program runs in the
item's work folder with SPOOLD_QUEUE, SPOOLD_ITEM, SPOOLD_ITEM_DIR and
SPOOLD_PAYLOAD set. A re-run after a crash runs it again: make it idempotent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import tempfile
import time
from typing import Any

from spoold.errors import Interrupted, PermanentError, TransientError
from spoold.handlers.base import Handler, StepContext, StepResult
from spoold.options import Seconds
from spoold.templates import render

EX_TEMPFAIL = 75
OUTPUT_TAIL_BYTES = 4000


@dataclasses.dataclass(frozen=True)
class ExecOptions:
    argv: list[str]
    timeout: Seconds | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    capture_fields: bool = False

    def __post_init__(self) -> None:
        if not self.argv:
            raise ValueError("argv must name a program")


class Exec(Handler[ExecOptions]):
    name = "exec"
    Options = ExecOptions

    def run(self, ctx: StepContext) -> StepResult:
        values = ctx.template_values()
        argv = [render(arg, values, is_path=False) for arg in self.options.argv]
        env = {**os.environ, **{k: render(v, values, is_path=False) for k, v in self.options.env.items()}}
        env.update(SPOOLD_QUEUE=ctx.queue, SPOOLD_ITEM=ctx.item, SPOOLD_ITEM_DIR=str(ctx.item_dir),
                   SPOOLD_PAYLOAD=":".join(str(p) for p in ctx.payload))  # fmt: skip
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                process = subprocess.Popen(argv, cwd=ctx.item_dir, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=err, start_new_session=True)  # fmt: skip
            except OSError as exc:
                raise PermanentError(f"cannot run {argv[0]}: {exc.strerror}") from None
            code = self._wait(ctx, process, argv[0])
            stdout, stderr = _read(out), _read(err)
        for line in (stdout + stderr).splitlines()[-50:]:
            ctx.log.info("%s: %s", os.path.basename(argv[0]), line)
        if code == EX_TEMPFAIL:
            raise TransientError(f"{argv[0]} asked to be retried later (exit 75): {_tail(stderr)}")
        if code != 0:
            raise PermanentError(f"{argv[0]} exited with {_describe(code)}: {_tail(stderr) or _tail(stdout)}")
        fields = self._captured_fields(stdout) if self.options.capture_fields else {}
        return StepResult(result={"exit_code": 0, "fields": sorted(fields)}, fields=fields)

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

    @staticmethod
    def _captured_fields(stdout: str) -> dict[str, Any]:
        lines = [line for line in stdout.strip().splitlines() if line.strip()]
        if not lines:
            raise PermanentError("capture_fields: the program printed nothing; expected a JSON object last")
        try:
            value = json.loads(lines[-1])
        except ValueError:
            raise PermanentError(f"capture_fields: the last line of output is not JSON: {lines[-1][:200]!r}") from None
        if not isinstance(value, dict):
            raise PermanentError("capture_fields: the last line of output must be a JSON object")
        return value


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
