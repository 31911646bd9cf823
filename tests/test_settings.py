"""The Space's settings, read once from the environment, and what a run folder records: typed, checked, strict."""

import pytest
import yaml

from dpo_space.run_record import DEFAULT_BETA, RunRecord, recorded_beta, recorded_reference
from dpo_space.settings import DEFAULT_MODEL_ID, EngineSettings, SpaceSettings


def test_an_empty_environment_gives_the_documented_defaults():
    settings = SpaceSettings.from_env({})
    assert settings == SpaceSettings()
    assert settings.model_id == DEFAULT_MODEL_ID and DEFAULT_MODEL_ID.endswith("models/smollm2-135m-dpo-hh-lora")
    assert settings.engine == EngineSettings(compile=True)  # the Space compiles its decoder; the engine alone not
    assert settings.concurrency == settings.engine.max_batch == 8


def test_values_are_parsed_and_concurrency_follows_max_batch():
    env = {"MODEL_ID": "me/model", "MAX_BATCH": "4", "STREAM_INTERVAL": "0", "DECODER": "generate",
           "DECODER_COMPILE": "0", "GRADIO_SERVER_PORT": "7861", "REF_MODEL_ID": "",
           "MALLOC_TRIM_SECONDS": "0"}  # fmt: skip
    settings = SpaceSettings.from_env(env)
    assert settings.model_id == "me/model" and settings.ref_model_id is None and settings.server_port == 7861
    assert settings.malloc_trim_seconds == 0.0 and SpaceSettings().malloc_trim_seconds == 60.0
    assert settings.engine == EngineSettings(decoder="generate", compile=False, max_batch=4, stream_interval=0.0)
    assert settings.concurrency == 4
    assert settings.engine.compile_cache_dir is None  # Inductor's own default, off a Space with persistent storage
    cached = SpaceSettings.from_env({"COMPILE_CACHE_DIR": "cache/compiled"})
    assert cached.engine.compile_cache_dir == "cache/compiled"
    secret = SpaceSettings.from_env({"HF_TOKEN": "hf_secret", "FEEDBACK_REPO": "me/votes"})
    assert secret.hf_token == "hf_secret" and "hf_secret" not in repr(secret) and secret.feedback_repo == "me/votes"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MAX_BATCH": "eight"}, "MAX_BATCH must be an integer of at least 1; got 'eight'"),
        ({"MAX_BATCH": "0"}, "MAX_BATCH must be an integer of at least 1; got '0'"),
        ({"STREAM_TIMEOUT": "nan"}, "STREAM_TIMEOUT must be a number of at least 0.001; got 'nan'"),
        ({"DTYPE": "fp8"}, "DTYPE must be one of auto, float32, bfloat16, float16; got 'fp8'"),
        ({"DECODER_COMPILE": "yes"}, "DECODER_COMPILE must be one of 0, 1; got 'yes'"),
        ({"MALLOC_TRIM_SECONDS": "-1"}, "MALLOC_TRIM_SECONDS must be a number of at least 0; got '-1'"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_accepts(env, message):
    with pytest.raises(ValueError) as error:
        SpaceSettings.from_env(env)
    assert str(error.value) == message


def write_record(folder, **training):
    RunRecord.write(folder, {"dataset_name": "hh.jsonl", "ref_model_name_or_path": None, "helpful_dataset_name": None},
                    {"model_name_or_path": "gpt2"}, {"beta": 0.25, **training}, "python -m train.dpo")  # fmt: skip


def test_a_run_record_round_trips_and_gives_the_reference_and_beta(tmp_path):
    write_record(tmp_path)
    record = RunRecord.read(tmp_path)
    assert (record.base, record.reference, record.beta, record.dataset) == ("gpt2", None, 0.25, "hh.jsonl")
    assert recorded_beta(str(tmp_path)) == 0.25 and recorded_reference(str(tmp_path)) == "gpt2"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert recorded_reference(str(tmp_path)) is None  # an adapter's reference is its base, adapter off


def test_a_folder_without_a_record_has_none_and_the_usual_beta(tmp_path):
    assert RunRecord.read(tmp_path) is None and recorded_beta(str(tmp_path)) == DEFAULT_BETA


def test_a_record_missing_a_key_is_an_error_that_names_it(tmp_path):
    write_record(tmp_path)
    data = yaml.safe_load((tmp_path / "run_config.yaml").read_text())
    del data["training"]["beta"]
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=r"run_config.yaml has no training.beta: retrain with train.dpo"):
        recorded_beta(str(tmp_path))
