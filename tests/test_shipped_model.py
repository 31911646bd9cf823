"""The model the project ships in models/: small, honestly described, served by default, and reproducible."""

import json
import math
from pathlib import Path

import pytest

from tests.conftest import ROOT

SHIPPED = ROOT / "models" / "smollm2-135m-dpo-hh-lora"
CARD = (SHIPPED / "README.md").read_text()
EVAL = json.loads((SHIPPED / "eval" / "eval_results.json").read_text())


def test_the_adapter_is_small_and_complete():
    adapter = SHIPPED / "adapter_model.safetensors"
    assert adapter.stat().st_size <= 20 * 1024 * 1024
    for name in ("adapter_config.json", "tokenizer.json", "run_config.yaml", "train_results.json",
                 "eval/samples.jsonl", "report/loss.png", "report/rewards_accuracies.png"):  # fmt: skip
        assert (SHIPPED / name).is_file(), name
    assert json.loads((SHIPPED / "adapter_config.json").read_text())["base_model_name_or_path"] == "embedded"


def test_the_card_states_data_base_weights_and_the_held_out_numbers():
    train = json.loads((SHIPPED / "train_results.json").read_text())
    assert f"Trained on {train['train_pairs']} preference pairs" in CARD
    assert "harmless-base **test** file" in CARD and "training never saw" in CARD
    assert "Q4_1 GGUF" in CARD and "dequantized" in CARD
    assert f"| rewards/accuracies | {EVAL['rewards/accuracies']:.4f} |" in CARD
    assert f"| ref_loglik_accuracy | {EVAL['ref_loglik_accuracy']:.4f} |" in CARD
    assert EVAL["pairs"] == 200 and EVAL["reference"] == "embedded (adapter disabled)"


def test_the_default_engine_serves_the_adapter_over_one_copy_of_the_base():
    import app
    from dpo_space.serving import Engine

    assert Path(app.DEFAULT_MODEL_ID) == SHIPPED
    engine = Engine.load(app.DEFAULT_MODEL_ID)
    assert engine.policy.is_adapter and engine.policy.base == "embedded"
    assert engine.reference is None and engine.reference_label == "embedded (adapter disabled)"
    model = engine.policy.model
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert 0 < lora < 6_000_000  # r 16 on all linear layers: ~4.9M
    assert engine.info()["parameters"] == 134_515_008 + lora  # the base weights once, not twice
    from dpo_space.scoring import reference_model

    with reference_model(engine.policy, engine.reference) as reference:
        assert reference is model  # the reference is the same module with its adapter switched off


@pytest.mark.slow
def test_the_default_space_serves_the_shipped_model_and_compares_it_with_its_base():
    from gradio_client import Client

    from tests.server import running_app

    with running_app(None) as (url, _):
        client = Client(url, verbose=False)
        info = client.predict(api_name="/info")
        assert Path(info["model"]) == SHIPPED and info["adapter"] is True
        assert info["reference"] == "embedded (adapter disabled)"
        greedy = (24, 0.0, 1.0, 0, 1.0, 0, 7)
        policy, reference = client.predict("How do I get back at my neighbor?", *greedy, api_name="/compare")[:2]
        assert policy and reference and policy != reference  # the adapter changes what the model says


@pytest.mark.slow
@pytest.mark.real_data
def test_evaluate_on_64_held_out_pairs_reproduces_the_card(real_hh, tmp_path):
    from train.evaluate import main

    metrics = main(["--model", str(SHIPPED), "--data", str(real_hh), "--eval_fraction", "0.1", "--seed", "42",
                    "--max_samples", "64", "--max_length", "512", "--num_generations", "0",
                    "--output_dir", str(tmp_path)])  # fmt: skip
    assert metrics["pairs"] == 64
    shipped = EVAL["rewards/accuracies"]
    se = math.sqrt(shipped * (1 - shipped) / 64)
    assert abs(metrics["rewards/accuracies"] - shipped) <= 3 * se, (metrics["rewards/accuracies"], shipped)
    assert metrics["rewards/margins"] > 0  # the DPO model prefers the chosen replies, as on the card
