"""Shared fixtures: local models (no Hub), the fixture data and the real HH sample when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_HH = ROOT / "tests" / "fixtures" / "hh_tiny.jsonl"
REAL_HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.sample2000.jsonl.gz"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Tests run in parallel workers (make test: one per core). One thread each, for the worker and the apps it
    # starts: OpenMP teams of several workers on the same cores would spin against each other.
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def embedded_path() -> str:
    from dpo_space.models import resolve

    return resolve("embedded")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_path):
    from dpo_space.models import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from dpo_space.models import resolve

    return resolve("tiny")


@pytest.fixture
def real_hh() -> Path:
    if not REAL_HH.is_file():
        pytest.skip(f"real HH-RLHF sample not found at {REAL_HH} (it lives in ../shared, never in the repo)")
    return REAL_HH


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_path) -> str:
    """A LoRA adapter trained for 4 steps on the tiny model: a policy whose reference differs from it."""
    from train.dpo import main

    out = tmp_path_factory.mktemp("tiny-adapter")
    main(
        ["--config", str(ROOT / "train/recipes/tiny.yaml"), "--output_dir", str(out),
         "--dataset_name", str(FIXTURE_HH), "--use_peft", "true", "--lora_r", "8",
         "--lora_target_modules", "all-linear", "--learning_rate", "1e-2", "--save_strategy", "no"]
    )  # fmt: skip
    return str(out)


@pytest.fixture(scope="session")
def tiny_engine(tiny_adapter):
    """The Space's engine over ``tiny_adapter`` in-process, decoding with the fp32 CPU decoder: the same tokens as a
    direct ``generate``, to compare the app's replies with."""
    from dpo_space.engine import Engine
    from dpo_space.settings import EngineSettings

    return Engine.load(tiny_adapter, settings=EngineSettings(decoder="fp32"))
