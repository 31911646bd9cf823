"""Single-stream decode levers, measured rather than assumed: dtype, a merged LoRA, a static cache with
``torch.compile``, int8 weight-only quantization, and the Space's ``LlamaDecoder`` (fp32, int4, compiled, with
the LoRA adapter kept apart).

    python -m bench.levers [--model embedded] [--adapter models/smollm2-135m-dpo-hh-lora] [--new-tokens 128]

Each lever decodes ``--new-tokens`` greedy tokens after a ~20-token prompt (``generate``, or the decoder's own
loop): one warm-up
call of the same shape (where ``torch.compile`` compiles: its time is reported apart), then the median of
``--repeats`` measured calls (single runs on this 2-core machine varied by up to a third).
``int8`` needs ``torchao`` (optional, not in the requirements: ``.venv/bin/pip install torchao==0.18.0``).
Prints a table and writes ``bench/results/levers.json``. Compare ratios within one run.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from bench.machine import write_result

PROMPT = "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined"
LEVERS = {
    "eager fp32 (the baseline)": {},
    "eager bf16": {"dtype": "bfloat16"},
    "LoRA adapter, unmerged, fp32": {"adapter": True},
    "LoRA adapter, merged, fp32": {"adapter": True, "merge": True},
    "static cache + torch.compile, fp32": {"compile": True},
    "static cache + torch.compile, bf16": {"compile": True, "dtype": "bfloat16"},
    "int8 weight-only (torchao), eager": {"int8": True},
    "int8 weight-only (torchao) + compile": {"int8": True, "compile": True},
    "LlamaDecoder fp32": {"decoder": "fp32"},
    "LlamaDecoder int4 (served)": {"decoder": "int4"},
    "LlamaDecoder int4 + torch.compile": {"decoder": "int4", "compile": True},
    "LlamaDecoder int4, LoRA apart (served)": {"decoder": "int4", "adapter": True},
    "LlamaDecoder int4, LoRA apart + compile": {"decoder": "int4", "adapter": True, "compile": True},
}


def decode(model, tokenizer, new_tokens: int, lever: dict, repeats: int) -> dict:
    import torch
    from transformers import CompileConfig

    kwargs = {}
    if lever.get("compile"):
        config = CompileConfig(mode="default", fullgraph=False, dynamic=False)
        config._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
        kwargs = {"cache_implementation": "static", "compile_config": config}
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    timings = []
    with torch.no_grad():
        for _ in range(1 + repeats):  # warm-up (and compilation) with the same shapes, then the measured calls
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs)
            timings.append(time.perf_counter() - started)
    return {"decode_tok_s": new_tokens / statistics.median(timings[1:]), "warmup_s": timings[0],
            "runs_tok_s": [new_tokens / t for t in timings[1:]]}  # fmt: skip


def decode_with_decoder(model, tokenizer, new_tokens: int, lever: dict, repeats: int) -> dict:
    """The Space's decoder: prefill, then one ``decode`` call a token, greedy."""
    from dpo_space.cpu.decoder import LlamaDecoder

    decoder = LlamaDecoder(model, lever["decoder"], max_rows=1)
    compile_s = decoder.compile() if lever.get("compile") else 0.0
    ids = tokenizer(PROMPT)["input_ids"]
    timings = []
    for _ in range(1 + repeats):
        started = time.perf_counter()
        decoder.reset()
        token = int(decoder.prefill(ids).argmax())
        for _ in range(new_tokens - 1):
            token = int(decoder.decode([token])[0].argmax())
        timings.append(time.perf_counter() - started)
    timings[0] += compile_s
    return {"decode_tok_s": new_tokens / statistics.median(timings[1:]), "warmup_s": timings[0],
            "runs_tok_s": [new_tokens / t for t in timings[1:]]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--adapter", default="models/smollm2-135m-dpo-hh-lora")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/levers.json"))
    args = parser.parse_args()

    import torch

    from dpo_space.models import load_model

    rows = []
    for name, lever in LEVERS.items():
        if lever.get("int8") and importlib.util.find_spec("torchao") is None:
            rows.append({"lever": name, "skipped": "torchao not installed"})
            continue
        dtype = getattr(torch, lever.get("dtype", "float32"))
        loaded = load_model(args.adapter if lever.get("adapter") else args.model, dtype=dtype, device="cpu")
        model = loaded.model
        if lever.get("merge"):
            model.merge_adapter()
        if lever.get("int8"):
            from torchao.quantization import Int8WeightOnlyConfig, quantize_

            quantize_(model, Int8WeightOnlyConfig())
        run = decode_with_decoder if lever.get("decoder") else decode
        rows.append({"lever": name, **run(model, loaded.tokenizer, args.new_tokens, lever, args.repeats)})
        print(rows[-1], flush=True)
        torch._dynamo.reset()

    baseline = rows[0]["decode_tok_s"]
    for row in rows:
        if "decode_tok_s" in row:
            row["vs_baseline"] = row["decode_tok_s"] / baseline
    result = {"model": args.model, "adapter": args.adapter, "new_tokens": args.new_tokens,
              "levers": rows}  # fmt: skip
    write_result(args.out, result)
    print(f"\n{'lever':<40} {'decode tok/s':>12} {'x baseline':>10} {'warm-up s':>10}")
    for row in rows:
        if "decode_tok_s" in row:
            tok_s, ratio, warmup = row["decode_tok_s"], row["vs_baseline"], row["warmup_s"]
            print(f"{row['lever']:<40} {tok_s:>12.1f} {ratio:>10.2f} {warmup:>10.1f}")
        else:
            print(f"{row['lever']:<40} {row['skipped']}")


if __name__ == "__main__":
    main()
