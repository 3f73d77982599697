"""checksum: digests of every payload file in one read pass.

Options: `algorithms` (any of sha256, xxh3_128, xxh64, md5; default sha256),
`sumfile` (write `<name>.sha256` beside the item, checkable by `sha256sum -c`).
Side effects: fills the item's digests (used by `ship` to verify and by
templates as `{sha256}`); with `sumfile`, adds one extra file.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from spoold.digest import Algorithm, hash_file
from spoold.errors import PermanentError
from spoold.handlers.base import Handler, StepContext, StepResult


@dataclasses.dataclass(frozen=True)
class ChecksumOptions:
    algorithms: list[Algorithm] = dataclasses.field(default_factory=lambda: ["sha256"])
    sumfile: bool = False

    def __post_init__(self) -> None:
        if not self.algorithms:
            raise ValueError("algorithms must name at least one of sha256, xxh3_128, xxh64, md5")


def payload_files(ctx: StepContext) -> list[Path]:
    """Every regular file of the payload, folders walked in sorted order; never follows links."""
    files: list[Path] = []
    for path in ctx.payload:
        if path.is_symlink():
            raise PermanentError(f"{path.name} is a symlink; it is never followed")
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(Path(root) / n for n in sorted(names) if not (Path(root) / n).is_symlink())
        elif path.is_file():
            files.append(path)
        else:
            raise PermanentError(f"payload file {path.name} is missing")
    return files


class Checksum(Handler[ChecksumOptions]):
    name = "checksum"
    Options = ChecksumOptions

    def run(self, ctx: StepContext) -> StepResult:
        algorithms = list(self.options.algorithms)
        if self.options.sumfile and "sha256" not in algorithms:
            algorithms.append("sha256")
        files = payload_files(ctx)
        total = sum(f.stat().st_size for f in files)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            ctx.progress(done, total)
            ctx.check_stop()

        digests: dict[str, dict[str, str]] = {}
        for path in files:
            ctx.check_stop()
            try:
                digests[str(path.relative_to(ctx.item_dir))] = hash_file(path, algorithms, advance)
            except FileNotFoundError:
                raise PermanentError(f"payload file {path.name} vanished while being read") from None
        ctx.digests.update(digests)
        result: dict[str, object] = dict(next(iter(digests.values()))) if len(digests) == 1 else {"files": digests}
        result["bytes"] = total
        extras = []
        if self.options.sumfile:
            sumfile = ctx.item_dir / f"{ctx.item}.sha256"
            lines = [f"{d['sha256']}  {rel}\n" for rel, d in digests.items()]
            tmp = sumfile.with_name(f".{sumfile.name}.tmp")
            tmp.write_text("".join(lines), encoding="utf-8")
            os.replace(tmp, sumfile)
            extras.append(sumfile)
        return StepResult(result=result, extras=extras)
