"""`python -m bench` (`make bench`): run every benchmark module present; one failing does not stop the rest."""

from __future__ import annotations

import importlib
import sys
import traceback

MODULES = ("core", "sftp", "s3", "s3_pull", "encode", "redact", "hostile", "remote_exec", "robot_000", "publish",
           "rate", "shared", "burst", "scale")


def main() -> int:
    failed = []
    for name in MODULES:
        try:
            module = importlib.import_module(f"bench.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"bench.{name}":
                continue  # this benchmark is not written yet
            raise
        print(f"\n=== bench.{name} ===", flush=True)
        try:
            module.main()
        except Exception:  # noqa: BLE001 - report and carry on with the next benchmark
            traceback.print_exc()
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
