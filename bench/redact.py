"""Benchmark: `spoold.redact.redact()` throughput on realistic log text and on adversarial inputs.

Environment (defaults in brackets):
  SPOOLD_BENCH_REDACT_MB [1]    size of each input, MiB
  SPOOLD_BENCH_REDACT_RUNS [3]  runs per input; the best is kept

Realistic text: log lines with URLs (some with userinfo passwords), `key=value` pairs, JSON documents, HTTP
headers, tracebacks and a few secrets, with a handful of registered secrets (target >= 20 MB/s). Adversarial
inputs repeat one fragment that invites backtracking (`"a=" * N`, `"password" * N`, `"://" * N`, a run without
spaces, many `@`, unterminated quotes and PEM blocks, ...): each must stay within 10x of the realistic rate,
i.e. linear time.

Run: python -m bench.redact
"""

from __future__ import annotations

import json
import os
import random
import time

from spoold.redact import redact, register_secret

SECRETS = ("s3cr3t-from-systemd", "hunter2.hunter2", "p@ss(w0rd)?[x]*+", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


def _env(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def _row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<44} {value:>14}  {note}")


def realistic_text(size: int, seed: int = 11) -> str:
    """`size` characters of mixed log lines, deterministic."""
    rng = random.Random(seed)
    words = ("queue", "item", "episode_000123", "cam_0", "frame", "upload", "checksum", "done", "retry", "in",
             "s3", "sftp", "manifest", "bytes", "ok", "failed", "settle", "claimed", "rename", "the", "to")  # fmt: skip

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    def line() -> str:
        stamp = f"2024-05-{rng.randint(1, 28):02d} 12:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        kind = rng.randrange(12)
        if kind == 0:
            folder = sentence(2).replace(" ", "/")
            body = f"ship to sftp://robot:{rng.choice(SECRETS)}@nas{rng.randint(1, 9)}.lan:22/data/{folder}"
        elif kind == 1:
            body = (f"PUT https://bucket.s3.eu-west-1.amazonaws.com/ep/{rng.randint(0, 10**6)}.mcap"
                    "?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20240501%2Feu-west-1%2Fs3"
                    "%2Faws4_request&X-Amz-Date=20240501T120000Z"
                    f"&X-Amz-Signature={rng.getrandbits(128):032x} 200")  # fmt: skip
        elif kind == 2:
            doc = {"name": f"episode_{rng.randint(0, 999):06d}", "state": "running", "bytes": rng.randint(0, 10**9),
                   "steps": [{"name": "checksum", "state": "done"}, {"name": "ship", "to": "s3://b/x"}]}  # fmt: skip
            if rng.random() < 0.3:
                doc["client_secret"] = f"{rng.getrandbits(64):x}"
            body = f"status {json.dumps(doc)}"
        elif kind == 3:
            body = f"request headers Authorization: Bearer {rng.getrandbits(160):040x} Host: api.example.com"
        elif kind == 4:
            body = f"env db_password={rng.choice(SECRETS)} user=robot tokens_used={rng.randint(0, 99)} tokenizer=bpe"
        elif kind == 5:
            body = (f'Traceback (most recent call last):\n  File "/usr/lib/python3/dist-packages/x.py", line '
                    f'{rng.randint(1, 999)}, in f\n    raise OSError("{sentence(4)}")')  # fmt: skip
        else:
            body = " ".join(f"{rng.choice(words)}={rng.randint(0, 9999)}" if rng.random() < 0.3 else rng.choice(words)
                            for _ in range(rng.randint(6, 16)))  # fmt: skip
        return f"{stamp},{rng.randint(0, 999):03d} INFO spoold.queue: {body}\n"

    parts: list[str] = []
    total = 0
    while total < size:
        parts.append(line())
        total += len(parts[-1])
    return "".join(parts)[:size]


ADVERSARIAL = {
    '"a=" * N': "a=",
    '"password" * N': "password",
    '"password=" * N': "password=",
    '"password: \'" * N': "password: '",
    '"://" * N': "://",
    '"://a:" * N': "://a:",
    '"a@" * N': "a@",
    '"@" * N': "@",
    "run without spaces (letters)": "x",
    "run without spaces (mixed)": "aZ9_.-+/",
    "spaces": " ",
    "backslashes": "\\",
    '"-----BEGIN RSA PRIVATE KEY-----" * N': "-----BEGIN RSA PRIVATE KEY-----",
    '"Authorization: " * N': "Authorization: ",
    '"Bearer " * N': "Bearer ",
    'dense matches: "pwd=x " * N': "pwd=x ",
    'dense matches: "://:x@" * N': "://:x@",
    '"token" + ": " * N': ": ",
    "registered secret prefixes": SECRETS[0][:-1],
}


def _adversarial(unit: str, size: int) -> str:
    if unit == ": ":
        return ("token" + unit * size)[:size]
    return (unit * (size // len(unit) + 1))[:size]


def _rate(text: str, runs: int) -> float:
    """MB/s (10^6 characters per second) of the best of `runs` calls."""
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        redact(text)
        best = min(best, time.perf_counter() - start)
    return len(text) / best / 1e6


def main() -> None:
    size = int(_env("SPOOLD_BENCH_REDACT_MB", 1) * (1 << 20))
    runs = int(_env("SPOOLD_BENCH_REDACT_RUNS", 3))
    for secret in SECRETS:
        register_secret(secret)
    text = realistic_text(size)
    masked = redact(text)
    assert not any(secret in masked for secret in SECRETS), "a registered secret was not masked"
    realistic = _rate(text, runs)
    print(f"redact() on {size / (1 << 20):g} MiB inputs, {len(SECRETS)} registered secrets (best of {runs})")
    _row("realistic log text", f"{realistic:,.1f} MB/s", "(target >= 20 MB/s)")
    worst = float("inf")
    for label, unit in ADVERSARIAL.items():
        rate = _rate(_adversarial(unit, size), runs)
        worst = min(worst, rate)
        _row(label, f"{rate:,.1f} MB/s", f"{realistic / rate:.1f}x slower" if rate < realistic else "")
    _row("slowest adversarial vs realistic", f"{realistic / worst:.1f}x", "(target <= 10x)")


if __name__ == "__main__":
    main()
