"""Load the real Space with many concurrent gradio_client users and report what happened.

    python -m bench.load [--model embedded] [--users 32] [--requests 3] [--rounds 3] [--max-new-tokens 32]

Starts ``app.py`` on a free loopback port, then runs rounds of USERS concurrent clients, each sending
REQUESTS streamed generations. Every request must either stream to completion or get the queue's busy
answer. Prints requests served, errors by kind, the server's RSS after each round, and single-request
latency before and after the load; writes ``bench/results/load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BUSY = "Queue is full"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def settings(max_new_tokens: int) -> list:
    return [max_new_tokens, 0.0, 1.0, 0, 1.0, 0, 0]  # greedy: every full reply to a prompt is the same


def user_session(url: str, user: int, requests: int, max_new_tokens: int) -> list[dict]:
    from gradio_client import Client

    client = Client(url, verbose=False)
    outcomes = []
    for n in range(requests):
        started = time.monotonic()
        job = client.submit(f"User {user} asks question {n}", "Assistant reply", *settings(max_new_tokens),
                            api_name="/generate")  # fmt: skip
        try:
            final = job.result(timeout=600)  # raises the busy answer; iterating a refused job never ends
            chunks = job.outputs()
            growing = all(b.startswith(a) for a, b in zip(chunks, chunks[1:], strict=False))
            kind = "completed" if growing and (not chunks or chunks[-1] == final) else "broken stream"
        except Exception as e:  # noqa: BLE001 - sorted into kinds below
            kind = "busy" if BUSY in str(e) else f"error: {str(e)[:120]}"
        outcomes.append({"user": user, "kind": kind, "seconds": time.monotonic() - started})
    return outcomes


def single_request_seconds(url: str, max_new_tokens: int, repeats: int = 3) -> float:
    from gradio_client import Client

    client = Client(url, verbose=False)
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        client.predict("How are you today?", "Assistant reply", *settings(max_new_tokens), api_name="/generate")
        times.append(time.monotonic() - started)
    return min(times)


def run_load(url: str, pid: int, users: int, requests: int, rounds: int, max_new_tokens: int) -> dict:
    before = single_request_seconds(url, max_new_tokens)
    rss, kinds = [rss_mb(pid)], Counter()
    for _ in range(rounds):
        with ThreadPoolExecutor(max_workers=users) as pool:
            futures = [pool.submit(user_session, url, u, requests, max_new_tokens) for u in range(users)]
            for future in futures:
                kinds.update(o["kind"] for o in future.result())
        rss.append(rss_mb(pid))
    after = single_request_seconds(url, max_new_tokens)
    return {"requests": users * requests * rounds, "outcomes": dict(kinds), "rss_mb": rss,
            "single_request_s_before": before, "single_request_s_after": after}  # fmt: skip


def main() -> None:
    from tests.server import running_app, wait_until_compiled

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    args = parser.parse_args()
    with running_app(args.model, DECODER_COMPILE="1") as (url, proc):  # the Space's default
        wait_until_compiled(url)
        result = run_load(url, proc.pid, args.users, args.requests, args.rounds, args.max_new_tokens)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    result |= {"model": args.model, "users": args.users, "max_new_tokens": args.max_new_tokens, "machine": machine}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
