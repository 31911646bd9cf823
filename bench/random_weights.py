"""A randomly initialised copy of a model (same config and tokenizer): speed does not depend on the weights.

    python -m bench.random_weights SOURCE_DIR OUT_DIR

SOURCE_DIR needs the config and tokenizer files only, so a model's shape can travel where its weights cannot
(the GPU machine receives 64 MiB; see bench/gpu.sh).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def main(source: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    model.save_pretrained(out)
    for path in Path(source).iterdir():
        if path.name.startswith(("tokenizer", "chat_template", "generation_config", "special_tokens")):
            shutil.copy(path, Path(out) / path.name)
    print(f"{out}: {sum(p.numel() for p in model.parameters()):,} random parameters")


if __name__ == "__main__":
    main(*sys.argv[1:3])
