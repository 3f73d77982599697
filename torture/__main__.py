"""`python -m torture [--quick] [CASE...]` (`make torture`): run the fault cases, print what each lost (nothing).

Every case module has `run(work: Path, quick: bool) -> list[Row]`. A case that
cannot run here (no faketime, no loop devices) returns a row saying so in its
figure with no items, and does not count as a failure. The exit status is 1 when
any row lost, corrupted, duplicated or published a temp file, logged a traceback
or left its daemon dead.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from torture.tally import Counts, Row, table

CASES = ("kills", "power", "disk", "events", "producers", "network", "partial", "clock", "soak")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m torture")
    parser.add_argument("--quick", action="store_true", help="fewer faults per case (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the work folders for a look afterwards")
    parser.add_argument("cases", nargs="*", metavar="CASE", help=f"cases to run (default: all of {', '.join(CASES)})")
    args = parser.parse_args()
    if unknown := [c for c in args.cases if c not in CASES]:
        parser.error(f"no such case: {', '.join(unknown)} (the cases: {', '.join(CASES)})")
    rows: list[Row] = []
    root = Path(tempfile.mkdtemp(prefix="spoold-torture-"))
    try:
        for name in args.cases or CASES:
            try:
                module = importlib.import_module(f"torture.{name}")
            except ModuleNotFoundError as exc:
                if exc.name == f"torture.{name}":
                    continue  # not written yet
                raise
            work = root / name
            work.mkdir()
            started = time.monotonic()
            print(f"=== torture.{name} ===", flush=True)
            try:
                new = module.run(work, args.quick)
            except Exception as exc:  # noqa: BLE001 - a broken case is a failed row, the others still run
                traceback.print_exc()
                new = [Row(name, "the case itself failed", Counts(), problems=[f"{type(exc).__name__}: {exc}"])]
            for row in new:
                print(table([row]).splitlines()[-1], flush=True)
            print(f"({time.monotonic() - started:.0f} s)", flush=True)
            rows.extend(new)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\n" + table(rows))
    bad = [row.case for row in rows if not row.is_clean]
    if bad:
        print(f"\nnot clean: {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
