"""One line naming the machine a benchmark ran on."""

from __future__ import annotations

import json
import os
from pathlib import Path


def describe() -> str:
    import torch

    from train.precision import native_bf16_flags, read_cpuinfo

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    cpuinfo = read_cpuinfo()
    lines = cpuinfo.splitlines()
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "CPU")
    native = native_bf16_flags(cpuinfo)
    text = (
        f"{name}, {os.cpu_count()} cores, native bf16: {' '.join(native) or 'none'}, torch {torch.__version__} (CPU)"
    )
    if cap := os.environ.get("ONEDNN_MAX_CPU_ISA"):  # how a CPU without native bf16 is emulated on one with it
        text += f", oneDNN capped at {cap} (ONEDNN_MAX_CPU_ISA)"
    return text


def write_result(path: Path, result: dict) -> None:
    """A benchmark's JSON, the machine it ran on first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": describe(), **result}, indent=2) + "\n")
