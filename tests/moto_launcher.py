"""moto's S3 server with conditional PUTs made atomic, as real S3 makes them.

moto checks a PUT's `If-Match` / `If-None-Match` and then writes, in two steps that are not atomic across its
request threads, so two racing writers can both win there although real S3 lets only one. Tests that race
conditional writes (`publish`) run the server through this launcher, which serialises `put_object`:

    python -m tests.moto_launcher -H 127.0.0.1 -p PORT
"""

from __future__ import annotations

import functools
import sys
import threading
from typing import Any


def serialise_puts() -> None:
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    unlocked = S3Response.put_object

    @functools.wraps(unlocked)
    def put_object(self: Any) -> Any:
        with lock:
            return unlocked(self)

    S3Response.put_object = put_object  # type: ignore[method-assign]


def main() -> None:
    serialise_puts()
    from moto.server import main as moto_main

    moto_main(sys.argv[1:])


if __name__ == "__main__":
    main()
