"""Compare training runs: a table and per-step plots (one line per run) on a Markdown page.

    python -m train.report outputs/sweep/* --out docs/sweep

Reads each run's ``train_results.json`` (log history, runtime), ``eval_results.json`` (held-out metrics from
the trainer) and ``run_config.yaml``; writes ``report.md``, ``report.json`` and PNG plots to ``--out``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dpo_space.cli import command_parser

logger = logging.getLogger(__name__)

PLOTS = {"loss": "Training loss", "rewards/accuracies": "Reward accuracy (train batches)",
         "rewards/margins": "Reward margin (train batches)"}  # fmt: skip
COLUMNS = ["run", "final train loss", "held-out reward accuracy", "held-out margin", "held-out loss", "wall time (s)",
           "pairs/s"]  # fmt: skip


def run_summary(run_dir: Path) -> dict:
    """One row of the comparison table, plus the per-step series for the plots."""
    train_path = run_dir / "train_results.json"
    if not train_path.is_file():
        raise ValueError(f"{run_dir}: no train_results.json; is it a finished train.dpo output directory?")
    train = json.loads(train_path.read_text())
    evaluation = (
        json.loads((run_dir / "eval_results.json").read_text()) if (run_dir / "eval_results.json").is_file() else {}
    )
    steps = [e for e in train["log_history"] if "loss" in e and "step" in e]
    series = {key: [(e["step"], e[key]) for e in steps if key in e] for key in PLOTS}
    return {
        "run": run_dir.name,
        "final train loss": steps[-1]["loss"] if steps else None,
        "held-out reward accuracy": evaluation.get("eval_rewards/accuracies"),
        "held-out margin": evaluation.get("eval_rewards/margins"),
        "held-out loss": evaluation.get("eval_loss"),
        "wall time (s)": train.get("train_runtime"),
        "pairs/s": train.get("train_samples_per_second"),
        "series": series,
    }


def plot(summaries: list[dict], key: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for summary in summaries:
        points = summary["series"][key]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=summary["run"])
    ax.set(title=title, xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(summaries: list[dict], images: list[str], title: str, notes: str = "") -> str:
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(s[c]) for c in COLUMNS) + " |" for s in summaries]
    lines += ["", *[f"![{name}]({name})" for name in images], ""]
    if notes:
        lines += [notes.strip(), ""]
    return "\n".join(lines)


def write_report(run_dirs: list[Path], out: Path, title: str = "DPO runs", notes: str = "") -> list[dict]:
    summaries = [run_summary(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for key, label in PLOTS.items():
        name = key.replace("/", "_") + ".png"
        plot(summaries, key, label, out / name)
        images.append(name)
    (out / "report.json").write_text(json.dumps(summaries, indent=2) + "\n")
    (out / "report.md").write_text(markdown(summaries, images, title, notes))
    logger.info("Wrote %s", out / "report.md")
    return summaries


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("runs", nargs="+", type=Path, help="train.dpo output directories")
    parser.add_argument("--out", type=Path, default=Path("outputs/report"))
    parser.add_argument("--title", default="DPO runs")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended under the plots (how it was run)")
    args = parser.parse_args(argv)
    write_report(args.runs, args.out, args.title, args.notes.read_text() if args.notes else "")


if __name__ == "__main__":
    main()
