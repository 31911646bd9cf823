"""A one-page report of a model's behaviour beside its reference, from ``train.evaluate``'s output, and the same
comparison across sweep points.

    python -m train.model_report models/smollm2-135m-dpo-hh-lora/eval
    python -m train.model_report --sweep outputs/sweep/*/eval [--baseline OTHER/eval] --out docs/alignment

A model's page (``report.md`` and ``behaviour.png`` beside its ``eval_results.json``): the targets, met or not;
XSTest compliance and refusal with 95% intervals; fluency; preference accuracy by source; a few replies side by
side. The sweep's page: one row per point with the same numbers and which point the selection rule
(``train.behaviour.pick``) picks.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dpo_space.cli import command_parser

logger = logging.getLogger(__name__)

PLOT = "behaviour.png"


def _pct(rate: dict | None) -> str:
    if not rate:
        return "-"
    low, high = rate["ci95"]
    return f"{rate['rate']:.2f} [{low:.2f}, {high:.2f}] ({rate['count']}/{rate['n']})"


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def plot_behaviour(results: dict, path: Path) -> Path:
    """Three panels: XSTest rates (model beside reference, 95% intervals), greedy repetition, accuracy by source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    behaviour = results["behaviour"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    colours = {"policy": "#4c72b0", "reference": "#bbbbbb"}
    names = {"policy": "DPO model", "reference": "reference"}

    ax = axes[0]
    measures = [("xstest_safe_compliance", "safe prompts\nanswered"),
                ("xstest_unsafe_refusal", "unsafe prompts\nrefused")]  # fmt: skip
    for offset, who in ((-0.2, "policy"), (0.2, "reference")):
        rates = [behaviour[who].get(key) for key, _ in measures]
        xs = [i + offset for i, r in enumerate(rates) if r]
        values = [r["rate"] for r in rates if r]
        errors = [[r["rate"] - r["ci95"][0] for r in rates if r], [r["ci95"][1] - r["rate"] for r in rates if r]]
        ax.bar(xs, values, 0.4, yerr=errors, capsize=3, color=colours[who], label=names[who])
    ax.set_xticks(range(len(measures)), [label for _, label in measures])
    ax.set_ylim(0, 1)
    ax.set_title("XSTest (greedy, 95% intervals)")
    ax.legend(loc="upper center", fontsize=8, ncols=2)

    ax = axes[1]
    groups = sorted(behaviour["policy"]["fluency"])
    for offset, who in ((-0.2, "policy"), (0.2, "reference")):
        values = [behaviour[who]["fluency"].get(g, {}).get("repeated_4gram_share", 0.0) for g in groups]
        ax.bar([i + offset for i in range(len(groups))], values, 0.4, color=colours[who], label=names[who])
    ax.set_xticks(range(len(groups)), [g.replace("/", "\n") for g in groups], fontsize=8)
    ax.set_title("Repeated 4-gram share (lower is better)")

    ax = axes[2]
    sources = [("HH harmless", results)]
    if results.get("helpful"):
        sources.append(("PandaLM helpful", results["helpful"]))
    ax.bar(range(len(sources)), [m["rewards/accuracies"] for _, m in sources], 0.5, color=colours["policy"])
    ax.axhline(0.5, color="black", linewidth=0.8, linestyle=":")
    ax.set_xticks(range(len(sources)), [name for name, _ in sources])
    ax.set_ylim(0, 1)
    ax.set_title("Held-out implicit-reward accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def examples_table(samples: list[dict], limit: int = 4) -> str:
    """A few greedy replies to XSTest's safe prompts, model beside reference."""
    greedy = {(s["set"], s["id"], s["model"]): s for s in samples if s["decoding"] == "greedy"}
    keys = [(st, i) for st, i, who in greedy if st == "xstest_safe" and who == "policy"][:limit]

    def cell(text: str) -> str:
        text = " ".join(text.split())
        return (text[:220] + " ...") if len(text) > 220 else text.replace("|", "\\|")

    pairs = [(greedy[k + ("policy",)], greedy[k + ("reference",)]) for k in keys if k + ("reference",) in greedy]
    rows = [f"| {cell(p['prompt'])} | {cell(p['reply'])} | {cell(r['reply'])} |" for p, r in pairs]
    return "\n".join(["| prompt | DPO model | reference |", "|---|---|---|", *rows])


def model_report_markdown(results: dict, samples: list[dict]) -> str:
    behaviour, generation = results["behaviour"], results["generation"]
    lines = [f"# Behaviour of `{results['model']}` beside its reference", "",
             f"Reference: `{results['reference']}`. Replies decoded as the Space decodes them "
             f"({generation['decoder']}), at most {generation['max_new_tokens']} new tokens, "
             f"seed {generation['seed']}; "
             f"prompts: {', '.join(f'{n} {k}' for k, n in generation['prompts'].items())}.", "",
             f"![behaviour]({PLOT})", ""]  # fmt: skip
    if results.get("targets"):
        lines += ["## Targets", "", "| target | value | threshold | met |", "|---|---|---|---|"]
        lines += [f"| {t['name']} | {_num(t['value'])} | {_num(t['threshold'])} | {'yes' if t['met'] else '**no**'} |"
                  for t in results["targets"]]  # fmt: skip
        lines.append("")
    lines += ["## Refusals (XSTest's refusal-phrase match, greedy)", "", "| measure | DPO model | reference |",
              "|---|---|---|"]  # fmt: skip
    for key, label in (("xstest_safe_compliance", "XSTest safe prompts answered"),
                       ("xstest_unsafe_refusal", "XSTest unsafe prompts refused"),
                       ("hh_refusal", "held-out HH prompts refused")):  # fmt: skip
        lines.append(f"| {label} | {_pct(behaviour['policy'].get(key))} | {_pct(behaviour['reference'].get(key))} |")
    lines += ["", "## Fluency", "", "| prompts / decoding | model | repeated 4-grams | distinct-2 | mean tokens | "
              "ended before the limit |", "|---|---|---|---|---|---|"]  # fmt: skip
    for group in sorted(behaviour["policy"]["fluency"]):
        for who in ("policy", "reference"):
            f = behaviour[who]["fluency"].get(group)
            if f:
                lines.append(f"| {group} | {who} | {f['repeated_4gram_share']:.3f} | {f['distinct_2']:.3f} | "
                             f"{f['mean_tokens']:.1f} | {f['ended_share']:.2f} |")  # fmt: skip
    lines += ["", "## Preference accuracy by source (held-out pairs)", "",
              "| source | pairs | implicit-reward accuracy | mean margin | reference's own log-likelihood accuracy |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, m in (("HH-RLHF harmless-base", results), ("PandaLM helpful", results.get("helpful"))):
        if m:
            lines.append(f"| {name} | {m['pairs']} | {m['rewards/accuracies']:.3f} | {m['rewards/margins']:+.3f} | "
                         f"{m['ref_loglik_accuracy']:.3f} |")  # fmt: skip
    lines += ["", "## Replies to XSTest's safe prompts (greedy; every reply is in samples.jsonl)", "",
              examples_table(samples), ""]  # fmt: skip
    return "\n".join(lines)


def write_model_report(eval_dir: str | Path) -> Path:
    eval_dir = Path(eval_dir)
    results = json.loads((eval_dir / "eval_results.json").read_text())
    with open(eval_dir / "samples.jsonl", encoding="utf-8") as f:
        samples = [json.loads(line) for line in f]
    plot_behaviour(results, eval_dir / PLOT)
    path = eval_dir / "report.md"
    path.write_text(model_report_markdown(results, samples))
    logger.info("Wrote %s", path)
    return path


# --- sweep ----------------------------------------------------------------------------------------------------------


def sweep_rows(eval_dirs: list[Path]) -> tuple[dict[str, dict], dict]:
    """Each point's summary (named by its run folder, with the reference's on the same prompts) and the first
    point's reference summary."""
    points, reference = {}, None
    for eval_dir in eval_dirs:
        results = json.loads((eval_dir / "eval_results.json").read_text())
        name = eval_dir.parent.name if eval_dir.name == "eval" else eval_dir.name
        prompts = results.get("generation", {}).get("prompts", {})
        points[name] = results["summary"]["policy"] | {"targets": results["targets"],
                                                       "reference": results["summary"]["reference"],
                                                       "prompts": "/".join(str(prompts.get(k, "-")) for k in (
                                                           "xstest_safe", "xstest_unsafe", "hh"))}  # fmt: skip
        reference = reference or results["summary"]["reference"]
    return points, reference


def sweep_markdown(points: dict[str, dict], reference: dict, picked: str, title: str,
                   baselines: dict[str, dict] | None = None) -> str:  # fmt: skip
    short = ["safe compliance", "unsafe refusal", "greedy repetition", "HH accuracy", "PandaLM accuracy"]
    keys = ["safe_compliance", "unsafe_refusal", "greedy_repetition", "hh_accuracy", "helpful_accuracy"]
    lines = [f"# {title}", "", "| point | prompts (safe/unsafe/HH) | " + " | ".join(short) + " | targets met |",
             "|---" * (len(short) + 3) + "|"]  # fmt: skip
    references = {}  # one row for the reference on each set of prompts
    for p in {**(baselines or {}), **points}.values():
        references.setdefault(p.get("prompts", "-"), p.get("reference", reference))
    for prompts, ref in references.items():
        lines.append(f"| reference | {prompts} | " + " | ".join(_num(ref.get(k)) for k in keys) + " | |")
    for name, p in {**(baselines or {}), **points}.items():
        met = sum(t["met"] for t in p["targets"])
        label = f"**{name}** (picked)" if name == picked else name if name in points else f"{name} (not a candidate)"
        values = " | ".join(_num(p.get(k)) for k in keys)
        lines.append(f"| {label} | {p.get('prompts', '-')} | {values} | {met} of {len(p['targets'])} |")
    return "\n".join(lines) + "\n"


def plot_sweep(points: dict[str, dict], reference: dict, path: Path) -> Path:
    """Safe-prompt compliance against held-out HH accuracy, one dot per point, the reference's level as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, p in points.items():
        ax.scatter(p["hh_accuracy"], p["safe_compliance"], s=30 + 300 * (p["unsafe_refusal"] or 0))
        ax.annotate(name, (p["hh_accuracy"], p["safe_compliance"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    ax.axhline(reference["safe_compliance"] - 0.05, color="grey", linestyle=":", label="reference - 0.05")
    ax.axvline(0.65, color="grey", linestyle="--", label="HH accuracy 0.65")
    ax.set_xlabel("held-out HH implicit-reward accuracy")
    ax.set_ylabel("XSTest safe prompts answered")
    ax.set_title("Sweep points (dot size: unsafe prompts refused)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_sweep_report(eval_dirs: list[Path], out: Path, title: str, baseline_dirs: list[Path] = ()) -> str:
    """The sweep's table and plot in ``out``; ``baseline_dirs`` (an earlier model, say) are shown, never picked."""
    from train.behaviour import pick

    points, reference = sweep_rows(eval_dirs)
    baselines = sweep_rows(list(baseline_dirs))[0] if baseline_dirs else {}
    picked = pick(points, reference)
    out.mkdir(parents=True, exist_ok=True)
    plot_sweep({**baselines, **points}, reference, out / "sweep.png")
    table = sweep_markdown(points, reference, picked, title, baselines)
    (out / "sweep.md").write_text(table + "\n![sweep](sweep.png)\n")
    (out / "sweep.json").write_text(json.dumps({"reference": reference, "points": points, "baselines": baselines,
                                                "picked": picked}, indent=2) + "\n")  # fmt: skip
    logger.info("Picked %s; wrote %s", picked, out / "sweep.md")
    return picked


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("eval_dirs", nargs="+", type=Path, help="train.evaluate output folders")
    parser.add_argument("--sweep", action="store_true", help="compare the folders as sweep points")
    parser.add_argument("--baseline", type=Path, action="append", default=[], help="an eval folder shown, not picked")
    parser.add_argument("--out", type=Path, default=Path("docs/alignment"))
    parser.add_argument("--title", default="Alignment sweep: behaviour of each point beside the reference")
    args = parser.parse_args(argv)
    if args.sweep:
        write_sweep_report(args.eval_dirs, args.out, args.title, args.baseline)
    else:
        for eval_dir in args.eval_dirs:
            write_model_report(eval_dir)


if __name__ == "__main__":
    main()
