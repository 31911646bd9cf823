"""What a model folder ships, as the Space reads it: the evaluation's numbers first, a behaviour table, plots."""

import json

from dpo_space.shipped import behaviour_markdown, display_name, held_out_metrics, plots

SUMMARY = {
    "policy": {"safe_compliance": 0.9, "unsafe_refusal": 0.4, "greedy_repetition": 0.05, "hh_accuracy": 0.66,
               "helpful_accuracy": 0.58},
    "reference": {"safe_compliance": 0.92, "unsafe_refusal": 0.1, "greedy_repetition": 0.09},
}  # fmt: skip
TARGETS = [{"name": "a target", "value": 0.9, "threshold": 0.87, "met": True},
           {"name": "held-out PandaLM accuracy >= 0.60", "value": 0.58, "threshold": 0.6, "met": False}]  # fmt: skip


def test_the_evaluation_comes_before_the_trainers_own_numbers(tmp_path):
    (tmp_path / "eval_results.json").write_text(json.dumps({"eval_rewards/accuracies": 0.5}))
    assert held_out_metrics(str(tmp_path)) == {"eval_rewards/accuracies": 0.5}  # only the trainer's so far
    (tmp_path / "eval").mkdir()
    helpful = {"pairs": 149, "rewards/accuracies": 0.58}
    evaluation = {"model": "m", "pairs": 200, "rewards/accuracies": 0.66, "helpful": helpful, "summary": SUMMARY,
                  "targets": TARGETS, "behaviour": {"big": 1}}  # fmt: skip
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps(evaluation))
    assert held_out_metrics(str(tmp_path)) == {"pairs": 200, "rewards/accuracies": 0.66,
                                               "helpful/rewards/accuracies": 0.58, "helpful/pairs": 149,
                                               "summary": SUMMARY, "targets": TARGETS}  # fmt: skip
    assert held_out_metrics(str(tmp_path / "missing")) == {}


def test_the_behaviour_table_says_which_targets_were_missed(tmp_path):
    assert "ships no behaviour evaluation" in behaviour_markdown(str(tmp_path))
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_results.json").write_text(json.dumps({"summary": SUMMARY, "targets": TARGETS}))
    table = behaviour_markdown(str(tmp_path))
    assert "| XSTest safe prompts answered (over-refusal: higher is better) | 0.900 | 0.920 |" in table
    assert "| held-out PandaLM implicit-reward accuracy | 0.580 | - |" in table
    assert table.endswith("Targets met: 1 of 2; missed: held-out PandaLM accuracy >= 0.60.")


def test_a_folder_is_named_by_its_own_name_and_its_plots_listed(tmp_path):
    folder = tmp_path / "my-model"
    (folder / "eval").mkdir(parents=True)
    (folder / "report").mkdir()
    for name in ("eval/behaviour.png", "report/loss.png"):
        (folder / name).write_bytes(b"png")
    assert display_name(str(folder)) == "my-model" and display_name("org/model") == "org/model"
    assert [p.relative_to(folder).as_posix() for p in plots(str(folder))] == ["eval/behaviour.png", "report/loss.png"]
    assert plots("org/model") == []
