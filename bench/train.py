"""Training speed: DPO pairs/s, peak RSS and held-out reward accuracy, original configuration vs the project's.

    python -m bench.train [--model embedded] [--pairs 64] [--eval-pairs 64] [--data ../shared/data/hh-rlhf/...]

Each configuration trains in its own process on the same first ``--pairs`` training pairs of the real HH
sample (same seed, one epoch), then evaluates on the same ``--eval-pairs`` held-out pairs, so a faster
recipe cannot win by learning less:
- ``original``: the original recipe (``gpt2-hh.yaml``: batch 1, full fine-tuning with an explicit reference
  copy, gradient checkpointing, bf16, lr 5e-7) on ``--model``;
- ``lora``: the project's CPU recipe (``smollm2-hh-lora.yaml``: LoRA, the reference is the adapter switched off)
  with the reference log-probs computed at every step, held-out batches of 8;
- ``lora-precomputed-ref``: the same with the reference log-probs computed once before training;
- ``lora-eval-batch-2``: that, with held-out batches of 2 (less peak memory);
- ``lora-completion-logits-only``: that, with the LM head projected at completion positions only (TRL projects
  every position on a CPU; ``train/speed.py``); every config above projects them all, as the original did;
- ``recipe``: the recipe as it is: that, with each pair's shared prompt run once (``--share_prompts``,
  ``train/speed.py``); every config above runs it twice, as the original did;
- ``recipe-bf16-weights``: the recipe with the frozen base weights stored in bf16 (the adapter stays fp32);
- ``recipe-top-15-layers``, ``recipe-top-8-layers``: the recipe with LoRA on the top 15 or 8 of the 30 layers
  only (``--lora_top_layers``): the backward pass stops below them;
- ``shipped``: the shipped model's recipe as it is (its loss, its precision choice), on its data mix: half of
  ``--pairs`` HH, half PandaLM's helpful pairs;
- ``original-fp32``, ``shipped-fp32``: those two in fp32, as ``precision: auto`` trains them on a CPU without
  native bf16 (where bf16 autocast is emulated, several times slower).
Held-out metrics come twice: from the trainer (under bf16 autocast, as it trains: a pair's summed log-probs move
by up to ~0.5 nats with the batch it is in, more than these short runs teach) and from ``train.evaluate`` in
fp32 on the same pairs (exact; the ones to compare).
Peak RSS is the process's own (``wait4``). Prints a table, writes ``bench/results/train.json``. Compare ratios
within one run, not absolute times across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe, write_result

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.sample2000.jsonl.gz"
HELPFUL = ROOT.parent / "shared" / "data" / "pandalm" / "testset-v1.json.gz"
SHIPPED_RECIPE = "train/recipes/smollm2-mix-balanced-lora.yaml"
EVAL_8 = ["--per_device_eval_batch_size", "8"]  # the recipe's held-out batches before they became 2
ALL_POSITIONS = ["--completion_logits_only", "false"]  # TRL's own CPU path: the LM head at prompt tokens too
TWICE = ["--share_prompts", "false"]  # TRL's own forward: a pair's prompt in the chosen and in the rejected row
LORA = ["--config", "train/recipes/smollm2-hh-lora.yaml"]
ORIGINAL = ["--config", "train/recipes/gpt2-hh.yaml", "--eval_fraction", "0.1", "--skip_bad_rows", "true",
            "--max_length", "512", *ALL_POSITIONS, *TWICE]  # fmt: skip
SHIPPED = ["--config", SHIPPED_RECIPE, "--helpful_dataset_name", str(HELPFUL)]
FP32 = ["--precision", "fp32"]
CONFIGS = {
    "original": ORIGINAL,
    "lora": [*LORA, "--precompute_ref_log_probs", "false", *EVAL_8, *ALL_POSITIONS, *TWICE],
    "lora-precomputed-ref": [*LORA, *EVAL_8, *ALL_POSITIONS, *TWICE],
    "lora-eval-batch-2": [*LORA, *ALL_POSITIONS, *TWICE],
    "lora-completion-logits-only": [*LORA, *TWICE],
    "recipe": LORA,  # the recipe as it is: that, running each pair's prompt once
    "recipe-bf16-weights": [*LORA, "--dtype", "bfloat16"],
    "recipe-top-15-layers": [*LORA, "--lora_top_layers", "15"],
    "recipe-top-8-layers": [*LORA, "--lora_top_layers", "8"],
    # the shipped model's recipe, its data mix kept: half the pairs HH, half PandaLM's helpful ones
    "shipped": SHIPPED,
    "original-fp32": [*ORIGINAL, *FP32],
    "shipped-fp32": [*SHIPPED, *FP32],
}  # fmt: skip
MIXED = {"shipped", "shipped-fp32"}  # configurations whose --pairs are half HH, half helpful


def run_config(name: str, args, out: Path) -> dict:
    hh_pairs = args.pairs - args.pairs // 2 if name in MIXED else args.pairs
    mix = ["--helpful_max_samples", str(args.pairs - hh_pairs)] if name in MIXED else []
    command = [sys.executable, "-m", "train.dpo", *CONFIGS[name], *mix, "--model_name_or_path", args.model,
               "--dataset_name", str(args.data), "--max_samples", str(hh_pairs),
               "--max_eval_samples", str(args.eval_pairs), "--num_train_epochs", "1", "--max_steps", "-1",
               "--save_strategy", "no", "--logging_steps", "1", "--output_dir", str(out)]  # fmt: skip
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{name} failed; see {log}:\n{log.read_text()[-2000:]}")
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    exact = fp32_evaluation(args, out)
    peak_rss_gb = usage.ru_maxrss / 2**20  # KiB on Linux
    return {
        "config": name,
        "pairs": train["train_pairs"],
        "train_s": train["train_runtime"],
        "pairs_per_s": train["train_pairs"] / train["train_runtime"],
        "peak_rss_gb": peak_rss_gb,
        "eval_reward_accuracy": evaluation["eval_rewards/accuracies"],
        "eval_reward_margin": evaluation["eval_rewards/margins"],
        "eval_loss": evaluation["eval_loss"],
        "fp32_eval_reward_accuracy": exact["rewards/accuracies"],
        "fp32_eval_reward_margin": exact["rewards/margins"],
        "wall_s": wall,
    }


def fp32_evaluation(args, out: Path) -> dict:
    """``train.evaluate``'s preference metrics for the model in ``out`` on the held-out pairs its run evaluated on."""
    command = [sys.executable, "-m", "train.evaluate", "--model", str(out), "--data", str(args.data),
               "--eval_fraction", "0.1", "--max_samples", str(args.eval_pairs), "--max_length", "512",
               "--num_generations", "0", "--output_dir", str(out / "fp32-eval")]  # fmt: skip
    log = out.with_suffix(".eval.log")
    with open(log, "w") as sink:
        if subprocess.run(command, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT).returncode:
            raise RuntimeError(f"evaluating {out.name} failed; see {log}:\n{log.read_text()[-2000:]}")
    return json.loads((out / "fp32-eval" / "eval_results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--eval-pairs", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train.json")
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"{args.data}: the HH-RLHF sample is missing; pass --data PATH")

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            rows.append(run_config(name, args, Path(tmp) / name))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows:
        row["speedup"] = row["pairs_per_s"] / base["pairs_per_s"]
        row["rss_ratio"] = row["peak_rss_gb"] / base["peak_rss_gb"]
    result = {"model": args.model, "pairs": args.pairs, "eval_pairs": args.eval_pairs,
              "runs": rows}  # fmt: skip
    write_result(args.out, result)
    print(f"\n{describe()}; {args.pairs} training pairs, {args.eval_pairs} held out")
    print(f"{'config':<28} {'pairs/s':>8} {'x orig':>7} {'peak RSS GB':>12} {'x orig':>7} {'held-out acc':>13} "
          f"{'fp32 acc':>9} {'fp32 margin':>12}")  # fmt: skip
    for r in rows:
        print(f"{r['config']:<28} {r['pairs_per_s']:>8.3f} {r['speedup']:>7.2f} {r['peak_rss_gb']:>12.2f} "
              f"{r['rss_ratio']:>7.2f} {r['eval_reward_accuracy']:>13.3f} {r['fp32_eval_reward_accuracy']:>9.3f} "
              f"{r['fp32_eval_reward_margin']:>12.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
