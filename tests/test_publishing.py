"""Sweeps, reports, model cards, publishing and the GitHub workflows."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURE_HH, ROOT
from train.publish import PublishError, files_to_upload, publish
from train.sweep import grid_points, parse_grid, point_command, point_name

TINY = str(ROOT / "train/recipes/tiny.yaml")


def test_grid_parsing_and_points():
    grid = parse_grid(["learning_rate=5e-6,5e-7", "beta=0.1"])
    assert grid_points(grid) == [{"learning_rate": "5e-6", "beta": "0.1"}, {"learning_rate": "5e-7", "beta": "0.1"}]
    assert point_name(grid_points(grid)[0]) == "learning_rate=5e-6,beta=0.1"
    lists = grid_points(parse_grid(["loss_weights=1 0,1 1"]))
    assert lists == [{"loss_weights": "1 0"}, {"loss_weights": "1 1"}] and point_name(lists[1]) == "loss_weights=1_1"
    command = point_command("r.yaml", lists[1], Path("out/loss_weights=1_1"), [])
    assert command[command.index("--loss_weights") :] == ["--loss_weights", "1", "1", "--output_dir",
                                                          "out/loss_weights=1_1"]  # fmt: skip
    for bad in (["learning_rate"], ["learning_rate="], ["=1"], ["lr=1,,2"]):
        with pytest.raises(ValueError, match="expected KEY=VALUE"):
            parse_grid(bad)


def sweep(out: Path) -> list[dict]:
    command = [sys.executable, "-m", "train.sweep", "--config", TINY, "--grid", "learning_rate=1e-3,1e-2",
               "--output_dir", str(out), "--", "--max_steps", "2", "--save_steps", "1",
               "--dataset_name", str(FIXTURE_HH)]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True)
    return json.loads((out / "sweep.json").read_text())["runs"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_path):
    out = tmp_path_factory.mktemp("sweep")
    runs = sweep(out)
    assert [r["status"] for r in runs] == ["trained", "trained"]
    return out


@pytest.mark.slow
def test_sweep_runs_each_point_and_skips_finished_ones(sweep_dir):
    first = sweep_dir / "learning_rate=1e-3"
    config = (first / "run_config.yaml").read_text()
    assert "learning_rate: 0.001" in config
    stamp = (first / "train_results.json").stat().st_mtime_ns
    assert [r["status"] for r in sweep(sweep_dir)] == ["skipped (finished)", "skipped (finished)"]
    assert (first / "train_results.json").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_an_interrupted_point_resumes_from_its_last_checkpoint(sweep_dir, tmp_path):
    out = tmp_path / "sweep"
    shutil.copytree(sweep_dir, out)
    point = out / "learning_rate=1e-2"
    (point / "train_results.json").unlink()  # as if killed after checkpoint-2 was written
    shutil.rmtree(point / "checkpoint-2")
    runs = sweep(out)
    assert [r["status"] for r in runs] == ["skipped (finished)", "trained"]
    history = json.loads((point / "train_results.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]  # step 1 restored from checkpoint-1


@pytest.mark.slow
def test_report_table_and_plots(sweep_dir, tmp_path):
    from train.report import write_report

    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    summaries = write_report(runs, tmp_path / "report", title="Tiny sweep", notes="## How this was run\n\nTiny.")
    page = (tmp_path / "report" / "report.md").read_text()
    assert page.startswith("# Tiny sweep\n\n| run | final train loss | held-out reward accuracy |")
    for run, summary in zip(runs, summaries, strict=True):
        train = json.loads((run / "train_results.json").read_text())
        evaluation = json.loads((run / "eval_results.json").read_text())
        assert summary["final train loss"] == [e for e in train["log_history"] if "loss" in e][-1]["loss"]
        assert summary["held-out reward accuracy"] == evaluation["eval_rewards/accuracies"]
        assert summary["held-out loss"] == evaluation["eval_loss"]
        assert summary["pairs/s"] == train["train_samples_per_second"] and f"| {run.name} |" in page
    for name in ("loss.png", "rewards_accuracies.png", "rewards_margins.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG" and f"![{name}]({name})" in page
    assert page.endswith("![rewards_margins.png](rewards_margins.png)\n\n## How this was run\n\nTiny.\n")


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path):
    from train.report import write_report

    with pytest.raises(ValueError, match="no train_results.json"):
        write_report([tmp_path], tmp_path / "out")


def test_model_card_has_what_a_reader_needs(tiny_adapter):
    from huggingface_hub import ModelCard

    card = ModelCard.load(Path(tiny_adapter) / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "tiny" and data["datasets"] == ["Anthropic/hh-rlhf"] and data["license"] == "mit"
    assert {"trl", "dpo", "lora"} <= set(data["tags"]) and data["library_name"] == "peft"
    text = card.text
    for section in ("## Behaviour beside the reference", "## Held-out preference metrics", "## Training curves",
                    "## Samples: DPO model vs reference",
                    "## Recipe", "## Usage", "## Limitations"):  # fmt: skip
        assert section in text
    assert "| rewards/accuracies |" in text and "![report/loss.png](report/loss.png)" in text
    assert "learning_rate: 0.01" in text and 'api_name="/generate"' in text
    assert f'load_model("models/{Path(tiny_adapter).name}")' in text  # a local base: this project's loader


def test_model_card_of_a_pushed_adapter_loads_it_from_the_hub(tiny_adapter, tmp_path):
    import shutil

    import yaml

    from train.card import build_card

    run = tmp_path / "run"
    shutil.copytree(tiny_adapter, run)
    config = yaml.safe_load((run / "run_config.yaml").read_text())
    config["model"]["model_name_or_path"] = "openai-community/gpt2"
    config["training"]["hub_model_id"] = "me/gpt2-dpo"
    (run / "run_config.yaml").write_text(yaml.safe_dump(config))
    text = build_card(run).text
    assert 'model = AutoPeftModelForCausalLM.from_pretrained("me/gpt2-dpo")' in text


def tree_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        digest.update(p.as_posix().encode())
        if p.is_file():
            digest.update(p.read_bytes())
    return digest.hexdigest()


def test_dry_run_lists_safetensors_tokenizer_card_and_metrics_only(tiny_adapter):
    files = {p.as_posix() for p in files_to_upload(Path(tiny_adapter))}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md",
            "train_results.json", "eval_results.json", "run_config.yaml", "report/loss.png"} <= files  # fmt: skip
    assert not any(f.startswith("checkpoint-") or f.endswith((".bin", ".pt", ".pth")) for f in files)
    out = subprocess.run([sys.executable, "-m", "train.publish", tiny_adapter, "--repo-id", "me/x", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert sorted(line.split()[2] for line in out.splitlines()) == sorted(files)


def test_no_token_is_an_error_before_anything_and_the_output_is_untouched(tiny_adapter, monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty login cache
    before = tree_digest(Path(tiny_adapter))
    with pytest.raises(PublishError, match="no Hugging Face token: set HF_TOKEN"):
        publish(Path(tiny_adapter), "me/x")
    assert tree_digest(Path(tiny_adapter)) == before


def test_no_network_is_a_clear_error_and_the_token_never_shows(tiny_adapter):
    secret = "hf_thisIsASecretTokenValue1234567890"
    env = {**os.environ, "HF_TOKEN": secret, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0"}
    proc = subprocess.run([sys.executable, "-m", "train.publish", tiny_adapter, "--repo-id", "me/x"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "cannot reach the Hugging Face Hub or the token was refused" in proc.stderr
    assert "nothing was uploaded" in proc.stderr
    assert secret not in proc.stdout + proc.stderr


def test_a_directory_without_weights_is_refused(tmp_path):
    with pytest.raises(PublishError, match="no .safetensors weights"):
        files_to_upload(tmp_path)


def test_workflows_pass_actionlint():
    actionlint = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    workflows = sorted(str(p) for p in (ROOT / ".github/workflows").glob("*.yml"))
    assert {Path(w).name for w in workflows} >= {"ci.yml", "deploy-space.yml", "train.yml"}
    proc = subprocess.run([actionlint, *workflows], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
