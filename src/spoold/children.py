"""Programs the daemon starts on this host die with it.

After `kill -9` of the daemon an orphaned child (an `exec` step's command, ffmpeg) would go on
working for an item the restarted daemon, or another node holding the item now, runs again, so
its effects would happen twice. Where util-linux's `setpriv` exists the kernel kills the child
with its parent (`--pdeathsig`); `preexec_fn` cannot set that safely in a threaded daemon.
"""

from __future__ import annotations

import errno
import os
import shutil

_SETPRIV = shutil.which("setpriv")
DEATH_SIGNAL = [_SETPRIV, "--pdeathsig", "KILL", "--"] if _SETPRIV else []


def dying_with_daemon(argv: list[str], path: str | None, cwd: str | os.PathLike[str]) -> list[str]:
    """`argv` behind `setpriv --pdeathsig KILL`; OSError as Popen would raise it when argv[0] cannot run.

    Checked here because behind setpriv a missing program is setpriv's exit status, not an OSError.
    """
    if not DEATH_SIGNAL:
        return argv
    program = argv[0]
    found = os.path.join(cwd, program) if "/" in program else shutil.which(program, path=path or os.defpath)
    if found is None or not os.path.exists(found):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)
    return [*DEATH_SIGNAL, *argv]
