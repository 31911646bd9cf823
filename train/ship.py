"""Ship a trained LoRA run into the repository: the adapter (bf16), tokenizer, card, metrics, plots and samples.

    python -m train.ship outputs/smollm2-hh-lora models/smollm2-135m-dpo-hh-lora

Run ``python -m train.evaluate RUN_DIR`` first: its held-out numbers and samples go into the card. Checkpoints,
optimizer state and training arguments stay behind. The adapter is stored in bfloat16 (half the bytes of
fp32); evaluate the shipped folder again to report what users get.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from dpo_space.cli import command_parser

logger = logging.getLogger(__name__)

MAX_ADAPTER_MB = 20
FILES = ["adapter_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
         "special_tokens_map.json", "train_results.json", "eval_results.json", "run_config.yaml"]  # fmt: skip
FOLDERS = ["report", "eval"]


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
