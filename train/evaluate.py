"""Held-out evaluation of a DPO model against its reference.

    python -m train.evaluate --model outputs/smollm2-hh \\
        --data ../shared/data/hh-rlhf/harmless-base-test.sample2000.jsonl.gz --eval_fraction 0.1 --seed 42

Preference metrics on held-out pairs (the same split ``train.dpo`` holds out for the same file, fraction and
seed): the implicit-reward accuracy beta * (log pi - log pi_ref) of chosen over rejected, the margin's mean and
spread, mean log-probs under policy and reference, and the reference's own log-likelihood accuracy. Then
greedy and sampled generations for N held-out prompts from both models with the same seeds: length,
distinct-2 and the share of repeated 4-grams. Writes ``eval_results.json``, ``samples.jsonl`` and
``eval_summary.md`` to ``--output_dir`` (default: ``MODEL_DIR/eval``, or ``outputs/eval`` for a Hub id).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
from contextlib import nullcontext
from pathlib import Path

logger = logging.getLogger(__name__)


def distinct_n(tokens: list[str], n: int) -> float:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repeated_ngram_share(tokens: list[str], n: int = 4) -> float:
    """Share of n-grams that already occurred earlier in the same text (0 = no repetition)."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def preference_metrics(policy: dict[str, list[float]], reference: dict[str, list[float]], beta: float) -> dict:
    """DPO's held-out numbers from summed completion log-probs of chosen and rejected under both models."""
    chosen_rewards = [beta * (p - r) for p, r in zip(policy["chosen"], reference["chosen"], strict=True)]
    rejected_rewards = [beta * (p - r) for p, r in zip(policy["rejected"], reference["rejected"], strict=True)]
    margins = [c - r for c, r in zip(chosen_rewards, rejected_rewards, strict=True)]
    ref_prefers = [c > r for c, r in zip(reference["chosen"], reference["rejected"], strict=True)]
    return {
        "pairs": len(margins),
        "beta": beta,
        "rewards/accuracies": sum(m > 0 for m in margins) / len(margins),
        "rewards/margins": statistics.fmean(margins),
        "rewards/margins_std": statistics.pstdev(margins),
        "rewards/chosen": statistics.fmean(chosen_rewards),
        "rewards/rejected": statistics.fmean(rejected_rewards),
        "logps/chosen": statistics.fmean(policy["chosen"]),
        "logps/rejected": statistics.fmean(policy["rejected"]),
        "ref_logps/chosen": statistics.fmean(reference["chosen"]),
        "ref_logps/rejected": statistics.fmean(reference["rejected"]),
        "ref_loglik_accuracy": sum(ref_prefers) / len(ref_prefers),
    }


def score_pairs(loaded, reference, rows: list[dict], batch_size: int, max_length: int | None) -> tuple[dict, dict]:
    """Summed completion log-probs of each pair's chosen and rejected, under the policy and the reference."""
    from tqdm.auto import tqdm

    from dpo_space.scoring import completion_logps, reference_model, tokenize_completion

    tok = loaded.tokenizer
    sequences = {"chosen": [], "rejected": []}
    for row in rows:
        for side in sequences:
            prompt_ids, completion_ids = tokenize_completion(tok, row["prompt"], row[side] + tok.eos_token)
            if max_length:  # keep_start, as the trainer truncates
                completion_ids = completion_ids[: max(0, max_length - len(prompt_ids))]
                prompt_ids = prompt_ids[:max_length]
            sequences[side].append((prompt_ids, completion_ids))

    def score(model, label):
        out = {}
        for side, seqs in sequences.items():
            out[side] = []
            for start in tqdm(range(0, len(seqs), batch_size), desc=f"{label} {side}", leave=False):
                out[side] += completion_logps(model, seqs[start : start + batch_size], batch_size)
        return out

    policy = score(loaded.model, "policy")
    with reference_model(loaded, reference) as ref:
        ref_scores = score(ref, "reference")
    return policy, ref_scores


def generation_samples(loaded, reference, rows: list[dict], max_new_tokens: int, seed: int) -> list[dict]:
    """Greedy and sampled replies of policy and reference to each prompt, with the same seed for both."""
    import torch

    from dpo_space.scoring import reference_model

    tok = loaded.tokenizer
    samples = []
    for i, row in enumerate(rows):
        ids = tok(row["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"].to(loaded.device)
        for decoding, kwargs in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "top_p": 0.9})):
            for who in ("policy", "reference"):
                context = reference_model(loaded, reference) if who == "reference" else nullcontext(loaded.model)
                with context as model, torch.no_grad():
                    torch.manual_seed(seed + i)
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=max_new_tokens,
                        pad_token_id=tok.pad_token_id,
                        **kwargs,
                    )
                new = out[0, ids.shape[1] :]
                text = tok.decode(new, skip_special_tokens=True)
                words = text.split()
                samples.append({"index": i, "model": who, "decoding": decoding, "prompt": row["prompt"], "reply": text,
                                "tokens": len(new), "distinct_2": distinct_n(words, 2),
                                "repeated_4gram_share": repeated_ngram_share(words, 4)})  # fmt: skip
    return samples


def generation_metrics(samples: list[dict]) -> dict:
    metrics = {}
    for who in ("policy", "reference"):
        for decoding in ("greedy", "sampled"):
            group = [s for s in samples if s["model"] == who and s["decoding"] == decoding]
            if group:
                for key in ("tokens", "distinct_2", "repeated_4gram_share"):
                    metrics[f"generation/{who}/{decoding}/{key}"] = statistics.fmean(s[key] for s in group)
    return metrics


def judge_win_rates(judge_id: str | None, samples: list[dict], rows: list[dict]) -> dict:
    """Win rates of the policy's greedy replies, scored by a reward model, over the reference's replies and over
    the dataset's chosen replies (as the DPO paper reports). A judge that cannot be loaded is reported, not fatal."""
    if not judge_id:
        return {}
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        kwargs = {"use_safetensors": True, "trust_remote_code": False}
        judge = AutoModelForSequenceClassification.from_pretrained(judge_id, **kwargs).eval()
        judge_tok = AutoTokenizer.from_pretrained(judge_id, trust_remote_code=False)
    except OSError as e:
        logger.warning("Judge %s could not be loaded (%s); win rates skipped", judge_id, str(e).splitlines()[0])
        return {"judge": judge_id, "judge_error": "could not be loaded; win rates skipped"}

    def score(prompt: str, reply: str) -> float:
        inputs = judge_tok(prompt, reply, return_tensors="pt", truncation=True, max_length=1024)
        with torch.no_grad():
            return float(judge(**inputs).logits[0, -1])

    greedy = {(s["index"], s["model"]): s["reply"] for s in samples if s["decoding"] == "greedy"}
    indices = sorted({i for i, _ in greedy})
    policy = {i: score(rows[i]["prompt"], greedy[i, "policy"]) for i in indices}
    versus_ref = [policy[i] > score(rows[i]["prompt"], greedy[i, "reference"]) for i in indices]
    versus_chosen = [policy[i] > score(rows[i]["prompt"], rows[i]["chosen"]) for i in indices]
    return {"judge": judge_id, "judge/win_rate_vs_reference": statistics.fmean(versus_ref),
            "judge/win_rate_vs_chosen": statistics.fmean(versus_chosen)}  # fmt: skip


def summary_markdown(model: str, reference: str, metrics: dict) -> str:
    lines = [
        f"# Held-out evaluation of `{model}`",
        "",
        f"Reference: `{reference}` · {metrics['pairs']} held-out pairs · beta {metrics['beta']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model dir, adapter dir, Hub id, or 'embedded'")
    parser.add_argument("--ref", default=None, help="reference model (default: adapter base / recorded base)")
    parser.add_argument("--data", required=True, help="HH-RLHF .jsonl(.gz) file or Hub dataset id")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="test", help="Hub split (ignored with --eval_fraction)")
    parser.add_argument("--eval_fraction", type=float, default=0.0, help="evaluate on this seeded held-out share")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--beta", type=float, default=None, help="default: the model's training beta, else 0.1")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--judge", default=None, help="reward-model id for win rates (optional)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output_dir", default=None)
    return parser.parse_args(argv)


def held_out_rows(args, tokenizer) -> list[dict]:
    from train.dpo import ScriptArguments, load_pairs

    script = ScriptArguments(
        dataset_name=args.data,
        dataset_data_dir=args.data_dir,
        dataset_train_split=args.split,
        dataset_test_split=None,
        eval_fraction=args.eval_fraction,
        max_samples=args.max_samples,
        max_eval_samples=args.max_samples,
        skip_bad_rows=True,
    )
    train, held_out = load_pairs(script, tokenizer, args.seed)
    return list(held_out if args.eval_fraction > 0 else train)  # a whole split (Hub test) loads as "train"


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)

    import torch

    from dpo_space.models import load_model
    from dpo_space.scoring import reference_label
    from dpo_space.serving import pick_dtype, recorded_beta, recorded_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = pick_dtype(args.dtype, device)
    loaded = load_model(args.model, dtype=dtype, device=device)
    ref_id = args.ref or recorded_reference(args.model)
    reference = load_model(ref_id, dtype=dtype, device=device) if ref_id else None
    ref_label = reference_label(loaded, reference)
    beta = args.beta if args.beta is not None else recorded_beta(args.model)

    rows = held_out_rows(args, loaded.tokenizer)
    policy_logps, ref_logps = score_pairs(loaded, reference, rows, args.batch_size, args.max_length)
    metrics = preference_metrics(policy_logps, ref_logps, beta)
    samples = generation_samples(loaded, reference, rows[: args.num_generations], args.max_new_tokens, args.seed)
    metrics |= generation_metrics(samples) | judge_win_rates(args.judge, samples, rows)

    default_out = Path(args.model) / "eval" if Path(args.model).is_dir() else Path("outputs/eval")
    out = Path(args.output_dir or default_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_results.json").write_text(json.dumps({"model": args.model, "reference": ref_label, **metrics},
                                                      indent=2) + "\n")  # fmt: skip
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    (out / "eval_summary.md").write_text(summary_markdown(args.model, ref_label, metrics))
    if out == Path(args.model) / "eval" and (Path(args.model) / "run_config.yaml").is_file():
        from train.card import write_card

        write_card(args.model)  # the card now shows these held-out numbers and samples
    logger.info("accuracy %.3f (reference's own %.3f) on %d pairs; wrote %s",
                metrics["rewards/accuracies"], metrics["ref_loglik_accuracy"], metrics["pairs"], out)  # fmt: skip
    return metrics


if __name__ == "__main__":
    main()
