"""Load the real Space with many concurrent users of every kind, and report what happened.

    python -m bench.load [--model MODEL_ID] [--users 16 32] [--requests 3] [--max-new-tokens 64]
    python -m bench.load --users 16 --minutes 30          # the soak: rounds of 16 users for 30 minutes
    python -m bench.load --users 16 --minutes 12 --malloc-stats   # and where the server's memory is (malloc_probe)

Starts ``app.py`` (default: the shipped DPO model; compiled, as a Space serves) on a free loopback port. For each
number of USERS, runs rounds in which every user sends REQUESTS requests, each of a kind drawn (seeded) from Chat
(``/chat`` with an earlier turn), Generate, Compare (both replies at once), an Arena round and its vote, and the
OpenAI-compatible API (the ``openai`` package, streamed). Every request must either complete or get the busy answer
(Gradio's "Queue is full", the API's 503). Reports per load: aggregate streamed tokens/s over the whole run (first
tokens included), time to first token p50/p95, the share answered busy, any other error, and the server's RSS and
an idle single-request latency after each round; ``--minutes`` repeats rounds for that long (the soak). Writes
``bench/results/load.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.machine import write_result
from dpo_space.memory import resident_mb

BUSY = ("Queue is full", "busy")  # Gradio's answer, and the OpenAI API's 503 message
KINDS = ("chat", "generate", "compare", "arena", "openai")


def settings(max_new_tokens: int) -> list:
    return [max_new_tokens, 0.0, 1.0, 0, 1.0, 0, 0]  # greedy: every full reply to a prompt is the same


REPLIES = {  # the reply texts in each endpoint's output
    "/chat": lambda out: [out], "/generate": lambda out: [out], "/compare": lambda out: list(out[:2]),
    "/arena": lambda out: list(out[1:]),  # (round id, reply A, reply B)
}  # fmt: skip


def gradio_call(client, args: list, api_name: str, started: float) -> tuple[object, list[str], float | None]:
    """Submit a streamed call; return its final output, its replies and the seconds until the first text arrived.
    A refused job's iterator never ends, so this polls."""
    replies = REPLIES[api_name]
    job = client.submit(*args, api_name=api_name)
    first = None
    while not job.done():
        if first is None and any(any(replies(out)) for out in job.outputs()):
            first = time.monotonic()
        time.sleep(0.02)  # TTFT to 20 ms; polling more often would take the server's CPU
    final = job.result(timeout=600)  # raises the busy answer
    if first is None and any(replies(final)):
        first = time.monotonic()
    return final, replies(final), first and first - started


def one_request(kind: str, client, api, policy_id: str, user: int, n: int, max_new_tokens: int) -> dict:
    started = time.monotonic()
    prompt = f"User {user} asks question {n}: how do I keep a plant alive?"
    ttft, texts = None, []
    try:
        if kind == "openai":
            stream = api.chat.completions.create(model=policy_id, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=max_new_tokens, temperature=0, stream=True)  # fmt: skip
            text = ""
            for chunk in stream:
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if delta:
                    ttft = ttft or time.monotonic() - started
                    text += delta
            texts = [text]
        elif kind == "chat":
            history = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi! How can I help?"}]
            args = [prompt, history, "", "DPO model", *settings(max_new_tokens)]
            _, texts, ttft = gradio_call(client, args, "/chat", started)
        elif kind == "generate":
            _, texts, ttft = gradio_call(client, [prompt, "Assistant reply", *settings(max_new_tokens)], "/generate",
                                         started)  # fmt: skip
        elif kind == "compare":
            _, texts, ttft = gradio_call(client, [prompt, *settings(max_new_tokens)], "/compare", started)
        else:  # an Arena round, then its vote
            final, texts, ttft = gradio_call(client, [prompt, *settings(max_new_tokens)], "/arena", started)
            client.predict(final[0], random.Random(n).choice(["A", "B", "tie", "both_bad"]), api_name="/vote")
        outcome = "completed"
    except Exception as e:  # noqa: BLE001 - sorted into outcomes below
        message = str(e)
        outcome = "busy" if any(b in message for b in BUSY) else f"error ({kind}): {message[:160]}"
    return {"kind": kind, "outcome": outcome, "ttft_s": ttft, "seconds": time.monotonic() - started, "texts": texts}


def user_session(url: str, policy_id: str, user: int, requests: int, max_new_tokens: int, seed: int) -> list[dict]:
    from gradio_client import Client
    from openai import OpenAI

    client = Client(url, verbose=False)
    api = OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=600)
    kinds = random.Random(seed * 1000 + user).choices(KINDS, k=requests)
    return [one_request(kind, client, api, policy_id, user, n, max_new_tokens) for n, kind in enumerate(kinds)]


def single_request_seconds(url: str, max_new_tokens: int, repeats: int = 3) -> float:
    from gradio_client import Client

    client = Client(url, verbose=False)
    times = []
    for _ in range(repeats):
        started = time.monotonic()
        client.predict("How are you today?", "Assistant reply", *settings(max_new_tokens), api_name="/generate")
        times.append(time.monotonic() - started)
    return min(times)


def percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1] if len(values) > 1 \
        else values[0]  # fmt: skip


def run_round(url: str, policy_id: str, users: int, requests: int, max_new_tokens: int, seed: int) -> tuple:
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=users) as pool:
        futures = [pool.submit(user_session, url, policy_id, u, requests, max_new_tokens, seed) for u in range(users)]
        outcomes = [o for future in futures for o in future.result()]
    return outcomes, time.monotonic() - started


def run_load(url: str, pid: int, users: int, requests: int, rounds: int = 1, max_new_tokens: int = 64,
             minutes: float = 0.0, count_tokens=None) -> dict:  # fmt: skip
    """Rounds of ``users`` concurrent users (``rounds``, or as many as fit in ``minutes``); ``count_tokens(text)``
    counts a reply's tokens (default: words)."""
    from openai import OpenAI

    count_tokens = count_tokens or (lambda text: len(text.split()))
    policy_id = next(m.id for m in OpenAI(base_url=url + "v1", api_key="unused").models.list() if m.id != "reference")
    idle = [single_request_seconds(url, max_new_tokens)]
    rss, outcomes, wall, per_round = [resident_mb(pid)["rss_mb"]], [], 0.0, []
    deadline = time.monotonic() + 60 * minutes
    for index in itertools.count():
        if (minutes and time.monotonic() > deadline) or (not minutes and index >= rounds):
            break
        done, seconds = run_round(url, policy_id, users, requests, max_new_tokens, seed=index)
        outcomes += done
        wall += seconds
        tokens = sum(count_tokens(t) for o in done if o["outcome"] == "completed" for t in o["texts"])
        rss.append(resident_mb(pid)["rss_mb"])
        idle.append(single_request_seconds(url, max_new_tokens))
        per_round.append({"seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
                          "rss_mb": round(rss[-1], 1), "idle_request_s": round(idle[-1], 3)})  # fmt: skip
    completed = [o for o in outcomes if o["outcome"] == "completed"]
    ttfts = [o["ttft_s"] for o in completed if o["ttft_s"] is not None]
    tokens = sum(count_tokens(t) for o in completed for t in o["texts"])
    kinds = Counter(o["outcome"] for o in outcomes)
    return {
        "users": users, "requests": len(outcomes), "rounds": len(per_round), "outcomes": dict(kinds),
        "by_kind": {k: dict(Counter(o["outcome"] for o in outcomes if o["kind"] == k)) for k in KINDS},
        "busy_share": round(kinds["busy"] / max(1, len(outcomes)), 3),
        "errors": sum(n for k, n in kinds.items() if k not in ("completed", "busy")),
        "tokens": tokens, "tokens_per_s": round(tokens / wall, 1) if wall else None,
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p95_s": percentile(ttfts, 0.95),
        "rss_mb": [round(r, 1) for r in rss], "idle_request_s": [round(s, 3) for s in idle], "per_round": per_round,
    }  # fmt: skip


def main() -> None:
    from dpo_space.models import load_tokenizer
    from dpo_space.settings import DEFAULT_MODEL_ID
    from dpo_space.shipped import display_name
    from tests.server import running_app, wait_until_compiled

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--users", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--requests", type=int, default=3, help="requests per user and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=0.0, help="repeat rounds for this long (a soak)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    parser.add_argument(
        "--malloc-stats",
        action="store_true",
        help="sample the server's glibc arenas and Python objects every 30 s (bench/malloc_probe.py)",
    )
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    loads = []
    probe, samples = "", None
    if args.malloc_stats:
        samples = Path(tempfile.mkdtemp(prefix="malloc-")) / "samples.jsonl"
        probe = f"from bench.malloc_probe import start\nstart({str(samples)!r})"
    # ARENA_MIN_SECONDS=0: the simulated visitors vote as soon as their replies end
    with running_app(args.model, preamble=probe, DECODER_COMPILE="1", ARENA_MIN_SECONDS="0") as (url, proc):
        wait_until_compiled(url)
        for users in args.users:
            loads.append(run_load(url, proc.pid, users, args.requests, args.rounds, args.max_new_tokens, args.minutes,
                                  count))  # fmt: skip
            print(json.dumps({k: v for k, v in loads[-1].items() if k != "per_round"}, indent=2))
    result = {"model": display_name(args.model), "max_new_tokens": args.max_new_tokens,
              "requests_per_user": args.requests, "minutes": args.minutes,
              "loads": loads}  # fmt: skip
    if samples is not None:  # none yet if the run was shorter than the probe's first 30 s
        lines = samples.read_text().splitlines() if samples.is_file() else []
        result["malloc_samples"] = [json.loads(line) for line in lines]
    write_result(args.out, result)


if __name__ == "__main__":
    main()
