"""Checkpoints that are never half-written and loadable.

The Trainer writes ``checkpoint-N`` in place. ``CheckpointMarks``, a ``TrainerCallback``, marks the folder
``.incomplete`` before the Trainer writes anything into it (``on_step_end``/``on_epoch_end``, when the Trainer is
about to save) and removes the mark only in ``on_save``, after the last file (``trainer_state.json``), so a run
killed while saving leaves a folder that resuming and loading refuse. An adapter's checkpoint records its base by
the name the run was given (``embedded``), as the final folder does, so it loads and evaluates on any machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import PartialState
from transformers import TrainerCallback

from dpo_space.models import INCOMPLETE_MARKER as INCOMPLETE

PREFIX = "checkpoint-"


def is_incomplete(folder: str | Path) -> bool:
    return (Path(folder) / INCOMPLETE).exists()


def checkpoint_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(PREFIX)
    return int(suffix) if folder.name.startswith(PREFIX) and suffix.isdigit() else None


def last_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step that was completely written, or None."""
    run_dir = Path(run_dir)
    complete = [
        p for p in run_dir.glob(f"{PREFIX}*")
        if checkpoint_step(p) is not None and not is_incomplete(p) and (p / "trainer_state.json").is_file()
    ]  # fmt: skip
    return max(complete, key=checkpoint_step, default=None)


def resolve_resume(value: str | None, output_dir: str) -> str | None:
    """``--resume_from_checkpoint``: a folder, or ``last`` (the last complete checkpoint in ``output_dir``)."""
    if value is None:
        return None
    if value in ("last", "true", "True"):
        found = last_complete_checkpoint(output_dir)
        return str(found) if found else None
    folder = Path(value)
    if not (folder / "trainer_state.json").is_file() or is_incomplete(folder):
        raise ValueError(
            f"checkpoint {value!r} is missing or was not completely written (the run was killed while saving); "
            f"resume from an earlier one or use --resume_from_checkpoint last"
        )
    return value


def record_adapter_base(folder: str | Path, base_name: str) -> None:
    """Record an adapter's base by its portable name (e.g. ``embedded``), not this machine's cache path."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(config, indent=2) + "\n")


class CheckpointMarks(TrainerCallback):
    """Marks each checkpoint folder ``.incomplete`` while the Trainer writes it (every rank waits for the mark
    before writing, and for every other rank before it is removed). ``adapter_base``: the name an adapter's
    checkpoint records as its base."""

    def __init__(self, adapter_base: str | None = None):
        self.adapter_base = adapter_base

    def _mark_if_saving(self, args, state, control):
        if not control.should_save:
            return
        folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
        if state.is_world_process_zero:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / INCOMPLETE).write_text("being written; not loadable\n")
        PartialState().wait_for_everyone()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark_if_saving(args, state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._mark_if_saving(args, state, control)

    def on_save(self, args, state, control, **kwargs):
        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            if self.adapter_base and (folder / "adapter_config.json").is_file():
                record_adapter_base(folder, self.adapter_base)
            (folder / INCOMPLETE).unlink(missing_ok=True)


class StopAfterSteps(TrainerCallback):
    """Ends training after ``steps`` optimizer steps, leaving the learning-rate schedule that of the whole run (the
    Trainer's ``max_steps`` would plan the schedule for ``steps`` instead)."""

    def __init__(self, steps: int):
        if steps < 1:
            raise ValueError(f"stop_after_steps must be at least 1; got {steps}")
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
