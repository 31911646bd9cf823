"""train.evaluate: its numbers match a direct computation and the DPO trainer's own eval on the same pairs."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURE_HH
from train.evaluate import distinct_n, main, preference_metrics, repeated_ngram_share


def test_text_statistics_on_literal_examples():
    words = "the cat sat on the cat sat on".split()
    assert distinct_n(words, 2) == 4 / 7  # the cat, cat sat, sat on, on the
    assert repeated_ngram_share(words, 4) == 1 - 4 / 5
    assert repeated_ngram_share("a b c".split(), 4) == 0.0 and distinct_n([], 2) == 0.0


def test_preference_metrics_on_literal_log_probs():
    policy = {"chosen": [-10.0, -20.0], "rejected": [-12.0, -15.0]}
    reference = {"chosen": [-11.0, -19.0], "rejected": [-11.0, -16.0]}
    m = preference_metrics(policy, reference, beta=0.5)
    # chosen rewards 0.5, -0.5; rejected rewards -0.5, 0.5; margins 1.0, -1.0
    assert (m["rewards/accuracies"], m["rewards/margins"], m["rewards/margins_std"]) == (0.5, 0.0, 1.0)
    assert (m["rewards/chosen"], m["logps/chosen"], m["ref_logps/rejected"]) == (0.0, -15.0, -13.5)
    assert m["ref_loglik_accuracy"] == 0.0  # reference: -11 vs -11 (tie is not a preference), -19 < -16


@pytest.fixture(scope="module")
def evaluation(tiny_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    metrics = main(["--model", tiny_adapter, "--data", str(FIXTURE_HH), "--eval_fraction", "0.25", "--seed", "42",
                    "--num_generations", "2", "--max_new_tokens", "8", "--output_dir", str(out)])  # fmt: skip
    return metrics, out


def test_matches_the_trainers_own_eval_on_the_same_pairs(evaluation, tiny_adapter):
    metrics, _ = evaluation
    trainer = json.loads((Path(tiny_adapter) / "eval_results.json").read_text())
    assert metrics["pairs"] == 4
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
                "logps/rejected"):  # fmt: skip
        assert metrics[key] == pytest.approx(trainer[f"eval_{key}"], rel=1e-3, abs=1e-4), key


def test_matches_a_direct_computation(evaluation, tiny_adapter, tiny_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_space.models import load_tokenizer
    from train.dpo import ScriptArguments, load_pairs

    metrics, _ = evaluation
    tok = load_tokenizer(tiny_adapter)
    script = ScriptArguments(dataset_name=str(FIXTURE_HH), eval_fraction=0.25)
    _, held_out = load_pairs(script, tok, 42)
    base = AutoModelForCausalLM.from_pretrained(tiny_path)
    policy = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_path), tiny_adapter
    ).merge_and_unload()

    def logp(model, prompt, completion):
        p = AutoTokenizer.from_pretrained(tiny_path)(prompt, add_special_tokens=False).input_ids
        ids = tok(prompt + completion + tok.eos_token, add_special_tokens=False).input_ids
        assert ids[: len(p)] == p
        x = torch.tensor([ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)[torch.arange(len(ids) - 1), x[0, 1:]]
        return lp[len(p) - 1 :].sum().item()

    margins = []
    for row in held_out:
        chosen = logp(policy, row["prompt"], row["chosen"]) - logp(base, row["prompt"], row["chosen"])
        rejected = logp(policy, row["prompt"], row["rejected"]) - logp(base, row["prompt"], row["rejected"])
        margins.append(0.1 * (chosen - rejected))
    assert metrics["rewards/margins"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-5)
    assert metrics["rewards/accuracies"] == sum(m > 0 for m in margins) / len(margins)


def test_writes_results_samples_and_summary(evaluation):
    metrics, out = evaluation
    results = json.loads((out / "eval_results.json").read_text())
    assert results["reference"] == "tiny (adapter disabled)" and results["pairs"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2  # prompts x (greedy, sampled) x (policy, reference)
    assert {"generation/policy/greedy/distinct_2", "generation/reference/sampled/repeated_4gram_share"} <= set(metrics)
    assert "| rewards/accuracies |" in (out / "eval_summary.md").read_text()


def test_an_unloadable_judge_is_reported_and_evaluation_goes_on(tiny_adapter, tmp_path):
    metrics = main(["--model", tiny_adapter, "--data", str(FIXTURE_HH), "--eval_fraction", "0.25",
                    "--num_generations", "1", "--max_new_tokens", "4", "--judge", "no-such-org/reward-model",
                    "--output_dir", str(tmp_path)])  # fmt: skip
    assert metrics["judge_error"] == "could not be loaded; win rates skipped"
    assert "rewards/accuracies" in metrics
