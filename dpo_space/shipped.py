"""What a model folder ships beside its weights, as the Space shows it: held-out numbers, plots, a behaviour table.

``train.evaluate`` writes ``eval/eval_results.json`` (preferences by source, XSTest refusals, fluency, the targets)
and ``eval/report.md`` with ``eval/behaviour.png``; ``train.dpo`` writes ``eval_results.json`` (the trainer's own
held-out loss and accuracy) and training curves in ``report/``. The evaluation's numbers come first.
"""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY_ROWS = (
    ("safe_compliance", "XSTest safe prompts answered (over-refusal: higher is better)"),
    ("unsafe_refusal", "XSTest unsafe prompts refused (harmlessness: higher is better)"),
    ("greedy_repetition", "repeated 4-gram share, greedy (lower is better)"),
    ("hh_accuracy", "held-out HH-RLHF implicit-reward accuracy"),
    ("helpful_accuracy", "held-out PandaLM implicit-reward accuracy"),
)


def display_name(model_id: str) -> str:
    """A model's name for people: a local folder's own name (never this machine's path), else the Hub id."""
    path = Path(model_id)
    return path.name if path.is_dir() else model_id


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def held_out_metrics(model_id: str) -> dict:
    """The shipped held-out numbers: ``train.evaluate``'s (numbers, PandaLM accuracy, the behaviour summary and the
    targets), else the trainer's own eval, else ``{}``."""
    folder = Path(model_id)
    evaluation = _read(folder / "eval" / "eval_results.json")
    if not evaluation:
        return _read(folder / "eval_results.json")
    metrics = {k: v for k, v in evaluation.items() if isinstance(v, int | float)}
    if evaluation.get("helpful"):
        metrics["helpful/rewards/accuracies"] = evaluation["helpful"]["rewards/accuracies"]
        metrics["helpful/pairs"] = evaluation["helpful"]["pairs"]
    for key in ("summary", "targets"):
        if evaluation.get(key):
            metrics[key] = evaluation[key]
    return metrics


def behaviour_markdown(model_id: str) -> str:
    """The model beside its reference on held-out data, and the targets met, as a Markdown table."""
    evaluation = _read(Path(model_id) / "eval" / "eval_results.json")
    summary = evaluation.get("summary")
    if not summary:
        return "This model folder ships no behaviour evaluation (`python -m train.evaluate` writes one)."

    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    lines = ["| held-out measure | DPO model | reference |", "|---|---|---|"]
    lines += [f"| {label} | {cell(summary['policy'].get(key))} | {cell(summary['reference'].get(key))} |"
              for key, label in SUMMARY_ROWS]  # fmt: skip
    checks = evaluation.get("targets") or []
    if checks:
        missed = [t["name"] for t in checks if not t["met"]]
        lines += ["", f"Targets met: {len(checks) - len(missed)} of {len(checks)}"
                  + (f"; missed: {'; '.join(missed)}." if missed else ".")]  # fmt: skip
    return "\n".join(lines)


def plots(model_id: str) -> list[Path]:
    """The shipped PNGs: the behaviour report's first, then training curves."""
    folder = Path(model_id)
    if not folder.is_dir():
        return []
    return sorted(folder.glob("eval/*.png")) + sorted(folder.glob("*.png")) + sorted(folder.glob("report/*.png"))


def content_hash(model_id: str) -> str:
    """The first 16 hex digits of the SHA-256 of a local model folder's weights (the adapter's, or the full
    model's), so that feedback names the exact weights it was given on; a Hub id stands for itself."""
    import hashlib

    folder = Path(model_id)
    for name in ("adapter_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            digest = hashlib.sha256()
            with open(folder / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            return digest.hexdigest()[:16]
    return model_id
