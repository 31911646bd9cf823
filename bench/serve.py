"""Serving speed: time to first token and decode speed, single stream and concurrent users over HTTP.

    python -m bench.serve [--model embedded] [--new-tokens 128] [--concurrency 1,2,4,8]

Side by side in one run, greedy, on prompts of about 16, 256 and 1,024 tokens:
- ``original``: the original demo's path, a non-streaming fp32 ``generate`` (the user sees the reply at the end);
- ``project``: this project's path, ``Engine.stream`` (streamed, the Space's default dtype);
- ``llama.cpp`` on the same GGUF, when ``llama-cpp-python`` is installed (optional).
Then 1/2/4/8 concurrent ``gradio_client`` users against the real app: aggregate tokens/s and p50/p95 time
to first token. Prints a table and writes ``bench/results/serve.json``. Figures are only comparable within
one run: read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

    ids = loaded.tokenizer(prompt, return_tensors="pt")["input_ids"]
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
    from dpo_space.serving import MODE_CONTINUE, GenerationSettings

    settings = GenerationSettings.validated(max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, top_k=0,
                                            repetition_penalty=1.0, no_repeat_ngram_size=0, seed=0)  # fmt: skip
    prepared = engine.prepare(prompt, MODE_CONTINUE, new_tokens)
    started = time.perf_counter()
    first, text = None, ""
    for partial in engine.stream(prepared, settings):
        first, text = first or time.perf_counter(), partial
    end = time.perf_counter()
    n = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    return {"ttft_s": first - started, "decode_tok_s": (n - 1) / max(end - first, 1e-9), "tokens": n}


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


def concurrent_users(url: str, tokenizer, users: int, new_tokens: int) -> dict:
    from gradio_client import Client

    prompt = prompt_of(tokenizer, 40)

    def one(_):
        client = Client(url, verbose=False)
        started = time.perf_counter()
        job = client.submit(prompt, "Continue text", new_tokens, 0.0, 1.0, 0, 1.0, 0, 0, api_name="/generate")
        first = None
        while not job.done():
            if first is None and job.outputs():
                first = time.perf_counter() - started
            time.sleep(0.005)
        text = job.result()
        return first or time.perf_counter() - started, len(tokenizer(text, add_special_tokens=False)["input_ids"])

    started = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        results = list(pool.map(one, range(users)))
    wall = time.perf_counter() - started
    ttfts = sorted(t for t, _ in results)
    p95 = ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))]
    return {"users": users, "aggregate_tok_s": sum(n for _, n in results) / wall,
            "ttft_p50_s": statistics.median(ttfts), "ttft_p95_s": p95}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", default="16,256,1024")
    parser.add_argument("--concurrency", default="1,2,4,8")
    parser.add_argument("--out", type=Path, default=Path("bench/results/serve.json"))
    args = parser.parse_args()

    import torch

    from dpo_space.models import load_model, load_tokenizer
    from dpo_space.serving import Engine
    from tests.server import running_app

    baseline = load_model(args.model, dtype=torch.float32)
    engine = Engine.load(args.model)
    paths = {
        "original": lambda p: original_path(baseline, p, args.new_tokens),
        "project": lambda p: project_path(engine, p, args.new_tokens),
        "llama.cpp": lambda p: llama_cpp_path(p, args.new_tokens),
    }
    rows = []
    for n in map(int, args.prompt_tokens.split(",")):
        prompt = prompt_of(baseline.tokenizer, n)
        for name, run in paths.items():
            result = run(prompt)
            rows.append(
                {"path": name, "prompt_tokens": n, **(result or {"skipped": "llama-cpp-python not installed"})}
            )
            print(rows[-1], flush=True)

    concurrency = []
    with running_app(args.model) as (url, _):
        tokenizer = load_tokenizer(args.model)
        for users in map(int, args.concurrency.split(",")):
            concurrency.append(concurrent_users(url, tokenizer, users, args.new_tokens))
            print(concurrency[-1], flush=True)

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    result = {"machine": machine, "model": args.model, "new_tokens": args.new_tokens, "single_stream": rows,
              "concurrent": concurrency}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'path':<10} {'prompt':>6} {'TTFT s':>8} {'decode tok/s':>13}")
    for row in rows:
        if "ttft_s" in row:
            print(f"{row['path']:<10} {row['prompt_tokens']:>6} {row['ttft_s']:>8.2f} {row['decode_tok_s']:>13.1f}")
    print(f"\n{'users':>5} {'aggregate tok/s':>16} {'TTFT p50 s':>11} {'TTFT p95 s':>11}")
    for row in concurrency:
        print(
            f"{row['users']:>5} {row['aggregate_tok_s']:>16.1f} {row['ttft_p50_s']:>11.2f} {row['ttft_p95_s']:>11.2f}"
        )


if __name__ == "__main__":
    main()
