"""What every `spoold` command shares: exit codes, the error that carries one, picking a queue."""

from __future__ import annotations

from spoold.daemon.config import Config

EX_OK = 0
EX_FAIL = 1
EX_USAGE = 64
EX_NOINPUT = 66
EX_CANTCREAT = 73
# `spoold drop --wait --timeout`: the items were dropped, but not all of them finished in time.
EX_TEMPFAIL = 75
EX_CONFIG = 78


class CliError(Exception):
    def __init__(self, message: str, code: int = EX_FAIL) -> None:
        super().__init__(message)
        self.code = code


def pick_queues(config: Config, queue: str | None) -> list[str]:
    if queue is None:
        return list(config.queues)
    if queue not in config.queues:
        raise CliError(f"no queue {queue!r} in {config.source}; queues: {', '.join(config.queues)}", EX_USAGE)
    return [queue]
