"""The training precision follows the machine: bf16 autocast only where it runs natively."""

import pytest

from tests.conftest import ROOT
from train.precision import choose_bf16, cpu_flags, native_bf16_flags, read_cpuinfo

AMD = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
XEON_WITHOUT = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n"
XEON_AMX = "flags\t\t: avx512f amx_tile amx_int8 amx_bf16\n"


def test_cpu_flags_of_a_cpuinfo_text():
    assert cpu_flags(AMD) == {"fpu", "sse2", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert cpu_flags("no flags here") == set()


def test_auto_picks_bf16_only_where_the_cpu_runs_it_natively():
    assert choose_bf16("auto", False, False, AMD) == (True, "CPU runs bf16 natively (avx512_bf16)")
    assert choose_bf16("auto", False, False, XEON_AMX)[0] is True
    use, why = choose_bf16("auto", False, False, XEON_WITHOUT)
    assert use is False and "no native bf16" in why
    assert choose_bf16("auto", True, True, XEON_WITHOUT)[0] is True  # a CUDA device decides on its own
    assert choose_bf16("auto", True, False, AMD)[0] is False


def test_the_recipe_can_force_either():
    assert choose_bf16("fp32", False, False, AMD) == (False, "precision: fp32 set by the recipe")
    assert choose_bf16("bf16", False, False, XEON_WITHOUT)[0] is True
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32; got 'fp16'"):
        choose_bf16("fp16", False, False, AMD)


@pytest.mark.parametrize("precision, expected", [("fp32", False), ("bf16", True)])
def test_the_job_sets_dpo_configs_bf16_from_precision(precision, expected):
    from train.dpo import parse_args

    _, args, _ = parse_args(["--config", str(ROOT / "train/recipes/smollm2-mix-lora.yaml"), "--precision", precision])
    assert args.bf16 is expected and not args.fp16


def test_a_benchmarks_machine_line_says_whether_bf16_is_native_and_how_it_was_capped(monkeypatch):
    from bench.machine import describe

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = native_bf16_flags(read_cpuinfo())
    assert f"native bf16: {' '.join(native) or 'none'}," in describe()
    assert "oneDNN capped" not in describe()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert describe().endswith(", oneDNN capped at AVX512_CORE_VNNI (ONEDNN_MAX_CPU_ISA)")
