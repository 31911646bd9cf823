"""Serving speed: time to first token and decode speed, single stream and concurrent users over HTTP.

    python -m bench.serve [--model MODEL_ID] [--new-tokens 128] [--concurrency 1,2,4,8]

``--model`` defaults to what visitors get: the shipped DPO adapter, kept apart from its embedded base (``embedded``
measures the base alone); llama.cpp runs the same base GGUF.

Side by side in one run, greedy, on prompts of about 16, 256 and 1,024 tokens (each path ``--repeats`` times,
interleaved; medians):
- ``original``: the original demo's path, a non-streaming fp32 ``generate`` (the user sees the reply at the end);
- ``project``: this project's path, ``Engine.stream`` (streamed, the Space's defaults: int4, compiled; measured
  once compiled); ``project, eager``: the same without compiling (``DECODER_COMPILE=0``);
- ``llama.cpp`` on the same GGUF, when ``llama-cpp-python`` is installed (optional).
Then 1/2/4/8 concurrent ``gradio_client`` users against the real app: aggregate tokens/s (over the whole run,
and decode only) and p50/p95 time to first token (``--in-process``, or without gradio installed: threads
calling the engine directly). Then 8 prompts at once three ways: a plain padded batch through ``generate``
(non-streaming), the project's batcher (8 streams), and transformers' continuous batching (``generate_batch``,
after a warm-up call).
Prints tables and writes ``bench/results/serve.json``. Figures are only comparable within one run: read
the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.machine import write_result
from dpo_space.settings import DEFAULT_MODEL_ID
from dpo_space.shipped import display_name

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from those used to make wine. "
)


def prompt_of(tokenizer, n_tokens: int) -> str:
    ids = tokenizer(TEXT * (n_tokens // 20 + 2), add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


def original_path(loaded, prompt: str, new_tokens: int) -> dict:
    """Non-streaming generate: the first token reaches the user with the last."""
    import torch

    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"].to(loaded.model.device)
    with torch.no_grad():
        started = time.perf_counter()
        loaded.model(ids)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        out = loaded.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
        total = time.perf_counter() - started
    n = out.shape[1] - ids.shape[1]
    return {"ttft_s": total, "decode_tok_s": (n - 1) / max(total - prefill, 1e-9), "tokens": n}


def project_path(engine, prompt: str, new_tokens: int) -> dict:
    started = time.perf_counter()
    ttft, n = engine_user(engine, prompt, new_tokens)
    end = time.perf_counter()
    idle = engine.scheduler.thread
    if idle:  # its thread ends when idle, and its OpenMP team with it: the next path runs alone
        idle.join()
    return {"ttft_s": ttft, "decode_tok_s": (n - 1) / max(end - started - ttft, 1e-9), "tokens": n}


def llama_cpp_path(prompt: str, new_tokens: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from dpo_space.models import embedded_gguf_path

    llm = Llama(model_path=str(embedded_gguf_path()), n_ctx=2048, n_threads=os.cpu_count(), verbose=False)
    started = time.perf_counter()
    first, n = None, 0
    for _ in llm(prompt, max_tokens=new_tokens, temperature=0.0, stream=True):
        first = first or time.perf_counter()
        n += 1
    end = time.perf_counter()
    return {"ttft_s": first - started, "decode_tok_s": (n - 1) / max(end - first, 1e-9), "tokens": n}


def median_run(results: list) -> dict:
    """The median of each figure over repeated runs of one path (``None``: the path is not installed)."""
    if results[0] is None:
        return {"skipped": "llama-cpp-python not installed"}
    median = {key: statistics.median(r[key] for r in results) for key in ("ttft_s", "decode_tok_s")}
    return {**median, "tokens": results[0]["tokens"], "runs_decode_tok_s": [r["decode_tok_s"] for r in results]}


POLL_S = 0.01  # how often a benchmark user looks for its stream's next update


def http_user(client, tokenizer, prompt: str, new_tokens: int):
    """One ``gradio_client`` user, already connected: (time to first token, tokens received).

    It looks for updates every ``POLL_S``, not through the job's iterator, which checks every millisecond: 8 such
    users took 0.7-0.9 CPU-seconds of a 2.5-3 s run, on the cores the server decodes on."""
    started = time.perf_counter()
    job = client.submit(prompt, "Continue text", new_tokens, 0.0, 1.0, 0, 1.0, 0, 0, api_name="/generate")
    first = None
    while not job.done():
        if first is None and job.outputs():
            first = time.perf_counter() - started
        time.sleep(POLL_S)
    text = job.result()
    return first or time.perf_counter() - started, len(tokenizer(text, add_special_tokens=False)["input_ids"])


def engine_user(engine, prompt: str, new_tokens: int):
    """A user calling the engine in-process: (time to first token, tokens received)."""
    from dpo_space.inputs import MODE_CONTINUE, GenerationSettings

    settings = GenerationSettings.validated(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                            repetition_penalty=1.0, no_repeat_ngram_size=0, seed=0)  # fmt: skip
    started = time.perf_counter()
    first, text = None, ""
    for partial in engine.stream(engine.prepare(prompt, MODE_CONTINUE, new_tokens), settings):
        first, text = first or time.perf_counter() - started, partial
    return first or time.perf_counter() - started, len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])


def concurrent_users(users: list) -> dict:
    """Each of ``users`` (calls returning (time to first token, tokens)) at once: aggregate tokens/s over the
    whole run (time to first token included), aggregate decode tokens/s (the tokens after each user's first,
    from the first user's first token to the last user's last: the single-stream ``decode_tok_s`` for several
    streams), p50/p95 time to first token. Connecting (and a first call) is done before, as a user of an open
    page has."""

    def timed(user):
        started = time.perf_counter()
        ttft, n = user()
        return ttft, n, started + ttft, time.perf_counter()

    started = time.perf_counter()
    with ThreadPoolExecutor(len(users)) as pool:
        results = list(pool.map(timed, users))
    wall = time.perf_counter() - started
    ttfts = sorted(r[0] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    decoding = max(r[3] for r in results) - min(r[2] for r in results)
    return {"users": len(users), "aggregate_tok_s": sum(r[1] for r in results) / wall,
            "aggregate_decode_tok_s": sum(r[1] - 1 for r in results) / max(decoding, 1e-9),
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": p95}  # fmt: skip


def batch_paths(loaded, engine, prompts: list[str], new_tokens: int) -> list[dict]:
    """The same prompts at once: padded ``generate``, the project's batcher, transformers' continuous batching."""
    from transformers import GenerationConfig

    from dpo_space.engine import in_own_thread

    tokenizer, model = loaded.tokenizer, loaded.model
    rows = []
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    started = time.perf_counter()  # generate runs without gradients itself (no_grad is per thread)
    out = in_own_thread(model.generate, **batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    wall = time.perf_counter() - started
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    rows.append({"path": "padded generate (not streamed)", "aggregate_tok_s": generated / wall})

    outcome = concurrent_users([functools.partial(engine_user, engine, prompts[0], new_tokens)] * len(prompts))
    rows.append({"path": "project batcher (streamed)", "aggregate_tok_s": outcome["aggregate_tok_s"],
                 "aggregate_decode_tok_s": outcome["aggregate_decode_tok_s"]})  # fmt: skip

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)  # fmt: skip
    try:
        in_own_thread(model.generate_batch, inputs=ids[:1], generation_config=config)  # warm-up: cache, attention
        started = time.perf_counter()
        results = in_own_thread(model.generate_batch, inputs=ids, generation_config=config)
        wall = time.perf_counter() - started
        generated = sum(len(r.generated_tokens) for r in results.values())
        rows.append({"path": "transformers continuous batching", "aggregate_tok_s": generated / wall})
    except Exception as e:  # noqa: BLE001 - an optional comparison: report why it did not run
        rows.append({"path": "transformers continuous batching", "skipped": f"{type(e).__name__}: {e}"[:200]})
    finally:
        model.set_attn_implementation("sdpa")  # generate_batch switches the model to paged attention
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", default="16,256,1024")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--repeats", type=int, default=3, help="single-stream runs per path and prompt (median)")
    parser.add_argument("--batch", type=int, default=8, help="prompts sent at once in the batching comparison")
    parser.add_argument("--in-process", action="store_true", help="concurrent users call the engine, not HTTP")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = parser.parse_args()

    import torch

    from dpo_space.engine import Engine, in_own_thread
    from dpo_space.models import load_model, load_tokenizer
    from dpo_space.settings import EngineSettings
    from tests.server import running_app, wait_until_compiled

    device = "cuda" if torch.cuda.is_available() else "cpu"
    baseline = in_own_thread(load_model, args.model, dtype=torch.float32, device=device)
    engine = Engine.load(args.model, settings=EngineSettings(compile=True))  # the Space default: compiles meanwhile
    eager = Engine(engine.policy, engine.reference, beta=engine.beta)
    engine.compiling.join()
    if not engine.compiled.is_set():
        raise SystemExit("compiling the decoder failed (see the log above)")
    paths = {
        "original": lambda p: original_path(baseline, p, args.new_tokens),
        "project": lambda p: project_path(engine, p, args.new_tokens),
        "project, eager": lambda p: project_path(eager, p, args.new_tokens),
        "llama.cpp": lambda p: llama_cpp_path(p, args.new_tokens),
    }
    rows = []
    for n in map(int, args.prompt_tokens.split(",")):
        prompt = prompt_of(baseline.tokenizer, n)
        runs = {name: [] for name in paths}
        for _ in range(args.repeats):  # interleaved, so a slow spell of the machine hits every path alike
            for name, run in paths.items():
                runs[name].append(in_own_thread(run, prompt))  # no OpenMP team stays (in_own_thread)
        for name, results in runs.items():
            rows.append({"path": name, "prompt_tokens": n, **median_run(results)})
            print(rows[-1], flush=True)

    prompt = prompt_of(baseline.tokenizer, 40)
    tokenizer = load_tokenizer(args.model)
    in_process = args.in_process or importlib.util.find_spec("gradio") is None
    concurrency = []
    with contextlib.nullcontext(None) if in_process else running_app(args.model, DECODER_COMPILE="1") as app:
        if app:
            wait_until_compiled(app[0])
        for users in map(int, args.concurrency.split(",")):
            if in_process:
                calls = [functools.partial(engine_user, engine, prompt, args.new_tokens)] * users
            else:
                from gradio_client import Client

                clients = [Client(app[0], verbose=False) for _ in range(users)]
                for client in clients:  # gradio_client's first call costs ~0.5 s more than later ones here
                    http_user(client, tokenizer, prompt, 1)
                calls = [functools.partial(http_user, c, tokenizer, prompt, args.new_tokens) for c in clients]
            concurrency.append({**concurrent_users(calls), "via": "in-process" if in_process else "HTTP"})
            print(concurrency[-1], flush=True)

    prompts = [prompt_of(baseline.tokenizer, 40 + 3 * i) for i in range(args.batch)]
    batched = batch_paths(engine.policy, engine, prompts, args.new_tokens)  # same weights and dtype as served
    for row in batched:
        print(row, flush=True)

    result = {"model": display_name(args.model), "new_tokens": args.new_tokens,
              "single_stream": rows, "concurrent": concurrency, "batch_of": args.batch,
              "batched": batched}  # fmt: skip
    write_result(args.out, result)
    print(f"\n{'path':<15} {'prompt':>6} {'TTFT s':>8} {'decode tok/s':>13}")
    for row in rows:
        if "ttft_s" in row:
            print(f"{row['path']:<15} {row['prompt_tokens']:>6} {row['ttft_s']:>8.2f} {row['decode_tok_s']:>13.1f}")
    print(f"\n{'users':>5} {'aggregate tok/s':>16} {'decode tok/s':>13} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    for row in concurrency:
        print(f"{row['users']:>5} {row['aggregate_tok_s']:>16.1f} {row['aggregate_decode_tok_s']:>13.1f} "
              f"{row['ttft_p50_s']:>11.2f} {row['ttft_p95_s']:>11.2f}")  # fmt: skip
    print(f"\n{args.batch} prompts at once {'aggregate tok/s':>28}")
    for row in batched:
        print(f"{row['path']:<34} {row.get('aggregate_tok_s', float('nan')):>10.1f} {row.get('skipped', '')}")


if __name__ == "__main__":
    main()
