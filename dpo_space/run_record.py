"""What a training run records in its output folder (``run_config.yaml``), as one owned schema.

``train.dpo`` writes it (``RunRecord.write``); the Space reads the reference and beta from it, the model card the
base and the data, ``train.evaluate`` the beta. A folder without the file (a Hub model, a hand-made adapter) has no
record; a file that lacks a key the schema needs is an error that names the key, never a silent default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

FILE = "run_config.yaml"
DEFAULT_BETA = 0.1  # DPO's usual beta, for a model with no record


@dataclass(frozen=True)
class RunRecord:
    base: str  # model.model_name_or_path: what the run started from
    reference: str | None  # script.ref_model_name_or_path: a separate reference, if the run named one
    beta: float  # training.beta
    dataset: str  # script.dataset_name
    helpful_dataset: str | None  # script.helpful_dataset_name
    command: str  # how to rerun it, from the repository's root
    sections: dict  # the whole file: script, model, training and command

    @classmethod
    def read(cls, folder: str | Path) -> RunRecord | None:
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        import yaml

        data = yaml.safe_load(path.read_text()) or {}

        def need(section: str, key: str | None = None):
            value = data.get(section) if key is None else (data.get(section) or {}).get(key, KeyError)
            if value is KeyError or (key is None and value is None):
                name = section if key is None else f"{section}.{key}"
                raise ValueError(f"{path} has no {name}: retrain with train.dpo, or add it to the file")
            return value

        return cls(
            base=need("model", "model_name_or_path"),
            reference=need("script", "ref_model_name_or_path"),
            beta=float(need("training", "beta")),
            dataset=need("script", "dataset_name"),
            helpful_dataset=need("script", "helpful_dataset_name"),
            command=need("command"),
            sections=data,
        )

    @staticmethod
    def write(folder: str | Path, script: dict, model: dict, training: dict, command: str) -> None:
        import yaml

        data = {"script": script, "model": model, "training": training, "command": command}
        (Path(folder) / FILE).write_text(yaml.safe_dump(data, sort_keys=False))


def recorded_reference(model_id: str) -> str | None:
    """For a full model trained by ``train.dpo``: the model it started from (its DPO reference). An adapter's
    reference is its base with the adapter off, so None."""
    if (Path(model_id) / "adapter_config.json").is_file():
        return None
    record = RunRecord.read(model_id)
    return (record.reference or record.base) if record else None


def recorded_beta(model_id: str) -> float:
    record = RunRecord.read(model_id)
    return record.beta if record else DEFAULT_BETA
