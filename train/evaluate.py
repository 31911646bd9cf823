"""Held-out evaluation of a DPO model beside its reference: preferences, over-refusal, harmlessness, fluency.

    python -m train.evaluate --model models/smollm2-135m-dpo-hh-lora \\
        --data ../shared/data/hh-rlhf/harmless-base-test.sample2000.jsonl.gz --eval_fraction 0.1 --seed 42 \\
        --helpful_data ../shared/data/pandalm/testset-v1.json.gz --xstest ../shared/data/xstest/xstest_prompts.csv

- **Preferences** on held-out pairs (the splits ``train.dpo`` holds out for the same files, fractions and seed),
  HH-RLHF and, with ``--helpful_data``, PandaLM apart: the implicit-reward accuracy of beta * (log pi - log pi_ref)
  of chosen over rejected, margins, log-probs, and the reference's own log-likelihood accuracy.
- **Over-refusal and harmlessness** on XSTest (``--xstest``): greedy replies of both models, classified by the
  paper's refusal-phrase match (``train.behaviour.is_refusal``): compliance on the safe prompts, refusal on the
  unsafe ones, with 95% Wilson intervals.
- **Fluency** on ``--num_generations`` held-out HH prompts and the XSTest safe prompts, greedy and sampled
  (temperature 0.7, top-p 0.9): repeated 4-gram share, distinct-2, length, share of replies that end before the
  token limit.

Replies are decoded the way the Space decodes them (its engine and batcher, several rows at once). Writes
``eval_results.json`` (with the targets, met or not), ``samples.jsonl`` (every reply), ``eval_summary.md``, a
one-page ``report.md`` with plots, and each pair's log-probs under both models (``policy_logps.json``,
``reference_logps.json``) to ``--output_dir`` (default: ``MODEL_DIR/eval``, or ``outputs/eval`` for a Hub id).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
from pathlib import Path

from dpo_space.cli import command_parser

logger = logging.getLogger(__name__)


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


def pair_key(row: dict, max_length: int | None) -> str:
    """A pair's identity for reusing its reference log-probs: its texts and the truncation length."""
    text = "\0".join([row["prompt"], row["chosen"], row["rejected"], str(max_length)])
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def score_pairs(loaded, reference, rows: list[dict], batch_size: int, max_length: int | None,
                known: dict | None = None, scored: dict | None = None) -> tuple[dict, dict]:  # fmt: skip
    """Summed completion log-probs of each pair's chosen and rejected, under the policy and the reference.

    ``known`` (``pair_key`` -> [chosen, rejected]) holds reference log-probs already computed, by an earlier
    evaluation with the same reference; new ones are added to it. ``scored``, when given, receives the policy's the
    same way."""
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
    known = {} if known is None else known
    keys = [pair_key(row, max_length) for row in rows]
    if scored is not None:
        scored.update({key: [c, r] for key, c, r in zip(keys, policy["chosen"], policy["rejected"], strict=True)})
    if not all(key in known for key in keys):
        with reference_model(loaded, reference) as ref:
            fresh = score(ref, "reference")
        known.update({key: [c, r] for key, c, r in zip(keys, fresh["chosen"], fresh["rejected"], strict=True)})
    ref_scores = {"chosen": [known[key][0] for key in keys], "rejected": [known[key][1] for key in keys]}
    return policy, ref_scores


SAMPLED = {"temperature": 0.7, "top_p": 0.9}  # the sampled setting; no top-k, no penalties


def generation_settings(decoding: str, max_new_tokens: int, seed: int):
    """The Space's ``GenerationSettings`` for plain greedy or plain nucleus sampling (no penalties)."""
    from dpo_space.inputs import GenerationSettings

    sampling = SAMPLED if decoding == "sampled" else {"temperature": 0.0, "top_p": 1.0}
    return GenerationSettings(max_new_tokens=max_new_tokens, top_k=0, repetition_penalty=1.0,
                              no_repeat_ngram_size=0, seed=seed, **sampling)  # fmt: skip


def generate_replies(engine, prompts: list[str], decoding: str, use_reference: bool, max_new_tokens: int,
                     seed: int) -> list[dict]:  # fmt: skip
    """Replies to formatted ``prompts``, decoded as the Space decodes (its batcher: several rows at once, each with
    its own seed ``seed + i``). Each reply: ``text`` and ``tokens`` (EOS not counted)."""
    from dataclasses import replace

    settings = generation_settings(decoding, max_new_tokens, seed)
    tok = engine.tokenizer
    requests = []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, add_special_tokens=False)["input_ids"][-engine.max_input_tokens :]
        requests.append(engine.submit(ids, replace(settings, seed=seed + i), use_reference, stream=False))
    replies = []
    for request in requests:
        request.wait_finished()
        if request.error is not None:
            raise RuntimeError(f"generation failed: {request.error!r}") from request.error
        replies.append({"text": tok.decode(request.generated, skip_special_tokens=True).strip(),
                        "tokens": len(request.generated)})  # fmt: skip
    return replies


def prompt_sets(tokenizer, hh_rows: list[dict], xstest_rows: list[dict]) -> dict[str, list[dict]]:
    """The prompts replies are generated for, by set: held-out HH dialogues (formatted as trained) and XSTest's safe
    and unsafe prompts (one user turn, as the Space formats a visitor's message)."""
    from dpo_space.prompts import format_user_prompt

    sets = {"hh": [{"id": str(i), "prompt": row["prompt"]} for i, row in enumerate(hh_rows)]}
    for label in ("safe", "unsafe"):
        chosen = [r for r in xstest_rows if r["label"] == label]
        if chosen:
            sets[f"xstest_{label}"] = [
                {
                    "id": r["id"],
                    "type": r["type"],
                    "text": r["prompt"],
                    "prompt": format_user_prompt(r["prompt"], tokenizer),
                }
                for r in chosen
            ]
    return sets


def generation_samples(engine, sets: dict[str, list[dict]], decodings: list[str], max_new_tokens: int, seed: int,
                       reuse: dict | None = None, sampled_sets=("hh", "xstest_safe")) -> list[dict]:  # fmt: skip
    """Every reply of the policy and the reference: greedy for every set, sampled for ``sampled_sets`` (fluency).
    ``reuse`` maps ``(set, id, decoding)`` to a reference reply already generated alike (``reusable_reference``),
    which is then not generated again."""
    from train.behaviour import is_refusal, repeated_ngram_share

    samples = []
    for decoding in decodings:
        for name, items in sets.items():
            if decoding != "greedy" and name not in sampled_sets:
                continue  # harm is measured greedy; sampled replies are for fluency
            for who in ("policy", "reference"):
                known = [reuse.get((name, item["id"], decoding)) for item in items] if reuse and who == "reference" \
                    else [None] * len(items)  # fmt: skip
                todo = [i for i, k in enumerate(known) if k is None]
                logger.info("%s %s %s: %d replies (%d reused)", who, decoding, name, len(todo), len(items) - len(todo))
                fresh = generate_replies(engine, [items[i]["prompt"] for i in todo], decoding, who == "reference",
                                         max_new_tokens, seed) if todo else []  # fmt: skip
                for i, reply in zip(todo, fresh, strict=True):
                    known[i] = reply
                for item, reply in zip(items, known, strict=True):
                    words = reply["text"].split()
                    samples.append({"set": name, "id": item["id"], "model": who, "decoding": decoding,
                                    "prompt": item.get("text", item["prompt"]), "reply": reply["text"],
                                    "tokens": reply["tokens"], "refusal": is_refusal(reply["text"]),
                                    "repeated_4gram_share": repeated_ngram_share(words, 4)})  # fmt: skip
    return samples


def behaviour_metrics(samples: list[dict], max_new_tokens: int) -> dict:
    """Per model: XSTest compliance on safe prompts and refusal on unsafe ones (greedy, with 95% Wilson intervals),
    refusals on HH prompts, and fluency by set and decoding."""
    from train.behaviour import fluency, rate

    out = {}
    for who in ("policy", "reference"):
        mine = [s for s in samples if s["model"] == who]
        greedy = {name: [s for s in mine if s["set"] == name and s["decoding"] == "greedy"]
                  for name in ("hh", "xstest_safe", "xstest_unsafe")}  # fmt: skip
        result = {}
        if greedy["xstest_safe"]:
            result["xstest_safe_compliance"] = rate([not s["refusal"] for s in greedy["xstest_safe"]])
        if greedy["xstest_unsafe"]:
            result["xstest_unsafe_refusal"] = rate([s["refusal"] for s in greedy["xstest_unsafe"]])
        if greedy["hh"]:
            result["hh_refusal"] = rate([s["refusal"] for s in greedy["hh"]])
        groups = sorted({(s["set"], s["decoding"]) for s in mine if s["set"] != "xstest_unsafe"})
        result["fluency"] = {}
        for name, decoding in groups:
            replies = [
                {"text": s["reply"], "tokens": s["tokens"]}
                for s in mine
                if (s["set"], s["decoding"]) == (name, decoding)
            ]
            result["fluency"][f"{name}/{decoding}"] = fluency(replies, max_new_tokens)
        fluency_greedy = [s for name in ("hh", "xstest_safe") for s in greedy[name]]
        result["greedy_repeated_4gram_share"] = (
            statistics.fmean(s["repeated_4gram_share"] for s in fluency_greedy) if fluency_greedy else None
        )
        out[who] = result
    return out


def summaries(behaviour: dict, hh: dict | None, helpful: dict | None) -> tuple[dict, dict]:
    """The numbers the targets compare, for the policy and the reference."""

    def summary(who):
        b = behaviour[who]
        return {"safe_compliance": b.get("xstest_safe_compliance", {}).get("rate"),
                "unsafe_refusal": b.get("xstest_unsafe_refusal", {}).get("rate"),
                "greedy_repetition": b.get("greedy_repeated_4gram_share")}  # fmt: skip

    policy = summary("policy") | {"hh_accuracy": hh["rewards/accuracies"] if hh else None,
                                   "helpful_accuracy": helpful["rewards/accuracies"] if helpful else None}  # fmt: skip
    return policy, summary("reference")


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

    hh_greedy = [s for s in samples if s["decoding"] == "greedy" and s["set"] == "hh"]
    greedy = {(int(s["id"]), s["model"]): s["reply"] for s in hh_greedy}
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
        f"Reference: `{reference}` · {metrics['pairs']} held-out HH pairs · beta {metrics['beta']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    flat = {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in flat.items()]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = command_parser(__doc__)
    parser.add_argument("--model", required=True, help="model dir, adapter dir, Hub id, or 'embedded'")
    parser.add_argument("--ref", default=None, help="reference model (default: adapter base / recorded base)")
    parser.add_argument("--data", required=True, help="HH-RLHF .jsonl(.gz) file or Hub dataset id")
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--split", default="test", help="Hub split (ignored with --eval_fraction)")
    parser.add_argument("--eval_fraction", type=float, default=0.0, help="evaluate on this seeded held-out share")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--helpful_data", default=None, help="PandaLM testset-v1.json(.gz): accuracy on its held-out "
                        "unanimous pairs (the split train.dpo holds out)")  # fmt: skip
    parser.add_argument("--helpful_eval_fraction", type=float, default=0.2)
    parser.add_argument("--xstest", default=None, help="XSTest's xstest_prompts.csv: compliance and refusal rates")
    parser.add_argument("--xstest_per_label", type=int, default=None, help="a seeded draw of N safe and N unsafe "
                        "prompts (default: all 250 + 200)")  # fmt: skip
    parser.add_argument("--beta", type=float, default=None, help="default: the model's training beta, else 0.1")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=None)
    parser.add_argument("--num_generations", type=int, default=100, help="held-out HH prompts to generate for")
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--decodings", default="greedy,sampled", help="greedy, sampled (temperature 0.7, top-p 0.9)")
    parser.add_argument("--sampled_sets", default="hh,xstest_safe", help="prompt sets also decoded sampled")
    parser.add_argument("--reuse_reference", default=None, help="an earlier evaluation's folder with the same "
                        "reference: its log-probs are reused, and its replies if generated alike")  # fmt: skip
    parser.add_argument("--decoder", default="auto", help="the Space's DECODER: auto, int4, fp32 or generate")
    parser.add_argument("--judge", default=None, help="reward-model id for win rates (optional)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    args.decodings = [d for d in args.decodings.split(",") if d]
    if not set(args.decodings) <= {"greedy", "sampled"} or "greedy" not in args.decodings:
        parser.error(f"--decodings takes greedy and optionally sampled; got {','.join(args.decodings)!r}")
    return args


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


def helpful_rows(args, tokenizer) -> list[dict]:
    from train.dpo import ScriptArguments, load_helpful_pairs

    script = ScriptArguments(helpful_dataset_name=args.helpful_data, helpful_eval_fraction=args.helpful_eval_fraction)
    return load_helpful_pairs(script, tokenizer, args.seed)[1]


REFERENCE_LOGPS = "reference_logps.json"
POLICY_LOGPS = "policy_logps.json"  # the same keys; what this model scored, for checking a later run against


def reusable_reference_logps(folder: str | None, reference: str) -> dict:
    """Reference log-probs of an earlier evaluation's pairs (``pair_key`` -> [chosen, rejected]), or ``{}``; an
    error if its reference differs from this run's."""
    if not folder:
        return {}
    earlier = json.loads((Path(folder) / "eval_results.json").read_text())
    if earlier.get("reference") != reference:
        raise ValueError(f"--reuse_reference {folder}: its reference ({earlier.get('reference')}) is not this run's "
                         f"({reference}); evaluate without it")  # fmt: skip
    path = Path(folder) / REFERENCE_LOGPS
    return json.loads(path.read_text()) if path.is_file() else {}


def reusable_reference(folder: str | None, generation: dict) -> dict | None:
    """Reference replies of an earlier evaluation, keyed ``(set, id, decoding)``: its greedy replies when it decoded
    with the same decoder and token limit (a greedy reply depends on neither the seed nor the other prompts), its
    sampled ones only when it also had the same seed and prompt sets (a sampled reply's seed is its place in its
    set). Else None, and they are generated again."""
    if not folder:
        return None
    earlier = json.loads((Path(folder) / "eval_results.json").read_text()).get("generation") or {}
    if any(earlier.get(key) != generation[key] for key in ("decoder", "max_new_tokens")):
        logger.info("--reuse_reference %s: other generation settings (%s); its replies are not reused", folder,
                    earlier)  # fmt: skip
        return None
    same = all(earlier.get(key) == generation[key] for key in ("seed", "prompts"))
    with open(Path(folder) / "samples.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {(r["set"], r["id"], r["decoding"]): {"text": r["reply"], "tokens": r["tokens"]}
            for r in rows if r["model"] == "reference" and (r["decoding"] == "greedy" or same)}  # fmt: skip


def main(argv=None) -> dict:
    args = parse_args(argv)

    from dpo_space.engine import Engine
    from dpo_space.run_record import recorded_beta
    from dpo_space.settings import EngineSettings
    from train.behaviour import read_xstest, targets, xstest_subset
    from train.model_report import write_model_report

    engine = Engine.load(args.model, args.ref, EngineSettings(dtype=args.dtype, decoder=args.decoder))
    loaded, reference = engine.policy, engine.reference
    beta = args.beta if args.beta is not None else recorded_beta(args.model)

    known = reusable_reference_logps(args.reuse_reference, engine.reference_label)
    scored = {}  # pair_key -> the policy's [chosen, rejected] log-probs, kept so that a later run can be checked

    def pair_metrics(pairs: list[dict]) -> dict:
        return preference_metrics(
            *score_pairs(loaded, reference, pairs, args.batch_size, args.max_length, known, scored), beta
        )

    rows = held_out_rows(args, loaded.tokenizer)
    metrics = pair_metrics(rows)
    helpful = None
    if args.helpful_data:
        helpful = metrics["helpful"] = pair_metrics(helpful_rows(args, loaded.tokenizer))

    xstest = xstest_subset(read_xstest(args.xstest), args.xstest_per_label, args.seed) if args.xstest else []
    sets = prompt_sets(loaded.tokenizer, rows[: args.num_generations], xstest)
    generation = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "decodings": args.decodings,
                  "sampled_sets": args.sampled_sets.split(","),
                  "decoder": engine.decoder, "prompts": {k: len(v) for k, v in sets.items()}}  # fmt: skip
    reuse = reusable_reference(args.reuse_reference, generation)
    sampled_sets = tuple(args.sampled_sets.split(","))
    samples = generation_samples(engine, sets, args.decodings, args.max_new_tokens, args.seed, reuse, sampled_sets)
    behaviour = behaviour_metrics(samples, args.max_new_tokens)
    policy, ref = summaries(behaviour, metrics, helpful)
    checks = [vars(t) for t in targets(policy, ref)] if xstest else []
    metrics |= judge_win_rates(args.judge, samples, rows)

    default_out = Path(args.model) / "eval" if Path(args.model).is_dir() else Path("outputs/eval")
    out = Path(args.output_dir or default_out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"model": args.model, "reference": engine.reference_label, **metrics, "generation": generation,
               "behaviour": behaviour, "summary": {"policy": policy, "reference": ref}, "targets": checks}  # fmt: skip
    (out / "eval_results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s, ensure_ascii=False) + "\n" for s in samples)
    (out / "eval_summary.md").write_text(summary_markdown(args.model, engine.reference_label, metrics))
    (out / REFERENCE_LOGPS).write_text(json.dumps(known) + "\n")
    (out / POLICY_LOGPS).write_text(json.dumps(scored) + "\n")
    write_model_report(out)
    if out == Path(args.model) / "eval" and (Path(args.model) / "run_config.yaml").is_file():
        from train.card import write_card

        write_card(args.model)  # the card now shows these held-out numbers and samples
    logger.info("HH accuracy %.3f on %d pairs; targets met %d of %d; wrote %s", metrics["rewards/accuracies"],
                metrics["pairs"], sum(t["met"] for t in checks), len(checks), out)  # fmt: skip
    return results


if __name__ == "__main__":
    main()
