"""Which precision a training run uses: bf16 autocast only where the hardware runs bf16 natively.

On a CPU without native bf16 (no AMX, no AVX512-BF16) autocast emulates it: a training step of the embedded model
took 3.6x as long as in fp32 on such a Xeon; on CPUs with it, bf16 was the faster one.
"""

from __future__ import annotations

from pathlib import Path

PRECISIONS = ("auto", "bf16", "fp32")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of ``/proc/cpuinfo``'s text (the first ``flags`` line; every core lists the same)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.is_file() else ""


def native_bf16_flags(cpuinfo: str) -> list[str]:
    """Which of ``NATIVE_BF16_CPU_FLAGS`` ``/proc/cpuinfo``'s text lists, sorted; empty without native bf16."""
    return sorted(cpu_flags(cpuinfo) & set(NATIVE_BF16_CPU_FLAGS))


def choose_bf16(precision: str, cuda: bool, cuda_bf16: bool, cpuinfo: str) -> tuple[bool, str]:
    """``(use bf16 autocast, why)`` for a recipe's ``precision`` on this machine."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision != "auto":
        return precision == "bf16", f"precision: {precision} set by the recipe"
    if cuda:
        return cuda_bf16, "CUDA device " + ("supports bf16" if cuda_bf16 else "without bf16")
    if native := native_bf16_flags(cpuinfo):
        return True, f"CPU runs bf16 natively ({', '.join(native)})"
    return False, "CPU has no native bf16 (no amx_bf16 or avx512_bf16): fp32 is faster there"
