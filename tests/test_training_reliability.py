"""Training that survives being killed, and bad input caught before any training step."""

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURE_HH, ROOT
from train.checkpoints import last_complete_checkpoint, resolve_resume
from train.dpo import main, parse_args

pytestmark = pytest.mark.slow  # trains, kills and resumes real runs

TINY = str(ROOT / "train/recipes/tiny.yaml")
ARGS = ["--config", TINY, "--dataset_name", str(FIXTURE_HH), "--max_steps", "16", "--save_steps", "2",
        "--learning_rate", "1e-3", "--eval_fraction", "0"]  # fmt: skip


def train_process(output_dir: Path, *extra: str, preamble: str = "") -> subprocess.Popen:
    code = preamble + f"\nfrom train.dpo import main\nmain({[*ARGS, '--output_dir', str(output_dir), *extra]!r})\n"
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def losses(run_dir: Path) -> list[tuple[int, float]]:
    history = json.loads((run_dir / "train_results.json").read_text())["log_history"]
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_path) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert train_process(out).wait(timeout=600) == 0
    return out


def test_kill_9_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path):
    proc = train_process(tmp_path)
    deadline = time.monotonic() + 300
    while last_complete_checkpoint(tmp_path) is None:  # kill as soon as one checkpoint is complete
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = last_complete_checkpoint(tmp_path)
    assert not (tmp_path / "train_results.json").exists()

    assert train_process(tmp_path, "--resume_from_checkpoint", "last").wait(timeout=600) == 0
    resumed, reference = losses(tmp_path), losses(uninterrupted)
    assert [s for s, _ in resumed] == [s for s, _ in reference] == list(range(1, 17))
    assert all(abs(a - b) < 1e-5 for (_, a), (_, b) in zip(resumed, reference, strict=True)), (killed_at, resumed)
    assert json.loads((tmp_path / "checkpoint-16" / "trainer_state.json").read_text())["global_step"] == 16
    files = {p.name for p in tmp_path.iterdir() if p.is_file()}
    assert files == {p.name for p in uninterrupted.iterdir() if p.is_file()}


def test_a_run_killed_while_saving_leaves_no_loadable_checkpoint(tmp_path, tiny_path):
    preamble = textwrap.dedent(
        """
        import os, signal
        from transformers import Trainer
        original = Trainer._save_optimizer_and_scheduler
        def die_while_saving_step_4(self, output_dir):
            if self.state.global_step == 4:
                os.kill(os.getpid(), signal.SIGKILL)  # weights of checkpoint-4 written, the rest not
            return original(self, output_dir)
        Trainer._save_optimizer_and_scheduler = die_while_saving_step_4
        """
    )
    assert train_process(tmp_path, preamble=preamble).wait(timeout=600) == -signal.SIGKILL
    half = tmp_path / "checkpoint-4"
    assert (half / "model.safetensors").is_file() and (half / ".incomplete").is_file()
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    with pytest.raises(ValueError, match="not completely written"):
        resolve_resume(str(half), str(tmp_path))
    from dpo_space.models import load_model

    with pytest.raises(ValueError, match="not completely written"):
        load_model(str(half))
    assert train_process(tmp_path, "--resume_from_checkpoint", "last").wait(timeout=600) == 0
    assert losses(tmp_path)[-1][0] == 16


def assert_fails_before_training(tmp_path, argv, error, match):
    with pytest.raises(error, match=match):
        main([*ARGS, "--output_dir", str(tmp_path), *argv])
    assert not list(tmp_path.glob("checkpoint-*"))


def test_a_missing_data_file_is_named(tmp_path, tiny_path):
    assert_fails_before_training(tmp_path, ["--dataset_name", "no/such/file.jsonl"], ValueError,
                                 r"data file 'no/such/file.jsonl' does not exist")  # fmt: skip


def test_a_malformed_row_is_named_with_file_and_row(tmp_path, tiny_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(FIXTURE_HH.read_text() + '{"chosen": "no marker", "rejected": "x"}\n')
    assert_fails_before_training(tmp_path, ["--dataset_name", str(data)], ValueError,
                                 r"bad\.jsonl \(train\), row 17: no '\\n\\nAssistant:' marker")  # fmt: skip


def test_a_wrong_recipe_value_is_named(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(TINY).read_text().replace("learning_rate: 1.0e-3", "learning_rate: fast"))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(recipe)])
    assert "argument --learning_rate/--learning-rate: invalid float value: 'fast'" in capsys.readouterr().err


def test_a_wrong_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(TINY).read_text() + "warmup_ratio: 0.1\n")
    with pytest.raises(ValueError, match="warmup_ratio"):
        parse_args(["--config", str(recipe)])


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(ValueError, match="missing or was not completely written"):
        resolve_resume(str(tmp_path / "checkpoint-9"), str(tmp_path))
    assert resolve_resume("last", str(tmp_path)) is None  # nothing yet: start from scratch


def test_a_missing_helpful_file_is_named(tmp_path, tiny_path):
    assert_fails_before_training(tmp_path, ["--helpful_dataset_name", "no/such/pandalm.json"], ValueError,
                                 r"helpful data file 'no/such/pandalm.json' does not exist")  # fmt: skip
