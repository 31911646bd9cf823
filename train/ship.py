"""Ship a trained LoRA run into the repository: the adapter (bf16), tokenizer, card, metrics, plots and samples.

    python -m train.ship outputs/smollm2-hh-lora models/smollm2-135m-dpo-hh-lora
    python -m train.ship outputs/smollm2-hh-lora/checkpoint-50 models/smollm2-135m-dpo-hh-lora

A checkpoint ships as the run stopped at its step: the run's ``run_config.yaml`` with ``--stop_after_steps N``
(the command that reproduces it), and the run's training results up to that step.

Run ``python -m train.evaluate RUN_DIR`` first: its held-out numbers and samples go into the card. Checkpoints,
optimizer state and training arguments stay behind. The adapter is stored in bfloat16 (half the bytes of
fp32); evaluate the shipped folder again to report what users get.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path

from dpo_space.cli import command_parser
from dpo_space.run_record import FILE, RunRecord
from train.checkpoints import checkpoint_step
from train.dpo import dpo_metrics

logger = logging.getLogger(__name__)

MAX_ADAPTER_MB = 20
FILES = ["adapter_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "special_tokens_map.json", "train_results.json", "eval_results.json", "run_config.yaml"]  # fmt: skip
FOLDERS = ["report", "eval"]


def record_checkpoint(checkpoint: Path, target: Path) -> None:
    """``run_config.yaml`` and ``train_results.json`` for ``checkpoint-N`` of a run: the run's, stopped after N."""
    import yaml

    step, run_dir = checkpoint_step(checkpoint), checkpoint.parent
    needed = [run_dir / FILE, run_dir / "train_results.json", checkpoint / "trainer_state.json"]
    if not all(path.is_file() for path in needed):
        raise ValueError(
            f"{checkpoint}: ship a checkpoint of a finished train.dpo run (it needs {FILE} and "
            "train_results.json in the run's folder, trainer_state.json in the checkpoint's)"
        )
    record = yaml.safe_load((run_dir / FILE).read_text())
    record["script"]["stop_after_steps"] = step
    command = shlex.split(record["command"])
    if "--stop_after_steps" in command:  # a checkpoint of a stopped run: its own step replaces the stop
        at = command.index("--stop_after_steps")
        del command[at : at + 2]
    command = shlex.join([*command, "--stop_after_steps", str(step)])
    RunRecord.write(target, record["script"], record["model"], record["training"], command)

    state = json.loads((checkpoint / "trainer_state.json").read_text())
    results = json.loads((run_dir / "train_results.json").read_text())
    log_history = [e for e in state["log_history"] if e.get("step", 0) <= step]
    last = next((e for e in reversed(log_history) if "rewards/accuracies" in e), {})
    results = {
        "train_pairs": results.get("train_pairs"),
        "global_step": step,
        "stopped_after_steps": step,
        **dpo_metrics(last),
        "log_history": log_history,
    }
    (target / "train_results.json").write_text(json.dumps(results, indent=2) + "\n")


def ship(run_dir: Path, target: Path) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    weights = run_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{run_dir}: no adapter_model.safetensors; ship a LoRA run (use_peft: true) that finished")
    target.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(weights).items()}
    save_file(tensors, target / weights.name, metadata={"format": "pt"})
    size_mb = (target / weights.name).stat().st_size / 2**20
    if size_mb > MAX_ADAPTER_MB:
        raise ValueError(f"the adapter is {size_mb:.1f} MB; the limit is {MAX_ADAPTER_MB} MB: lower lora_r")
    for name in FILES:
        if (run_dir / name).is_file():
            shutil.copy(run_dir / name, target / name)
    if checkpoint_step(run_dir) is not None and not (run_dir / FILE).is_file():
        record_checkpoint(run_dir, target)
    for name in FOLDERS:
        if (run_dir / name).is_dir():
            shutil.copytree(run_dir / name, target / name, dirs_exist_ok=True)
    from train.card import write_card

    write_card(target)
    logger.info("Shipped %s -> %s (adapter %.1f MB, bf16)", run_dir, target, size_mb)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = command_parser(__doc__)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    ship(args.run_dir, args.target)


if __name__ == "__main__":
    main()
