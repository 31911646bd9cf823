"""The Space's settings, read once from the environment into typed, checked values (docs/configuration.md).

``SpaceSettings.from_env()`` is the only place that reads them; a bad value is a ``ValueError`` that names the
variable and what it accepts. ``EngineSettings`` is the part the model engine needs, so that training's
evaluation and the benchmarks configure the engine the same way without an environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's own DPO model (a LoRA adapter on the embedded SmolLM2-135M-Instruct), shipped in the repository.
DEFAULT_MODEL_ID = str(ROOT / "models" / "smollm2-135m-dpo-hh-lora")


def on_persistent_space(env: Mapping[str, str]) -> bool:
    """A Hugging Face Space with persistent storage (mounted at ``/data``, kept across restarts)."""
    return bool(env.get("SPACE_ID")) and Path("/data").is_dir()


def default_feedback_dir(env: Mapping[str, str]) -> str:
    """A Space with persistent storage keeps feedback in ``/data``; anywhere else, a folder beside the app."""
    return "/data/feedback" if on_persistent_space(env) else str(ROOT / "feedback")


def default_compile_cache_dir(env: Mapping[str, str]) -> str | None:
    """Where the compiled decoder step is cached: ``/data`` on a Space with persistent storage (a restarted
    container finds it there); elsewhere None, Inductor's own (``TORCHINDUCTOR_CACHE_DIR``, else a temporary
    folder that outlives the process)."""
    return "/data/compile-cache" if on_persistent_space(env) else None


DTYPES = ("auto", "float32", "bfloat16", "float16")
DECODERS = ("auto", "int4", "fp32", "generate")


@dataclass(frozen=True)
class EngineSettings:
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on a CPU (the faster there; the int4 decoder packs from it)
    decoder: str = "auto"  # auto: the int4 CPU decoder where it runs (a Llama on a CPU), else generate
    compile: bool = False  # compile the CPU decoder's step in the background, serving eagerly meanwhile
    compile_cache_dir: str | None = None  # Inductor's on-disk cache (None: its default); warm, a start takes seconds
    max_batch: int = 8  # requests decoded together
    max_input_tokens: int = 1024  # a longer prompt keeps its last tokens
    stream_interval: float = 0.1  # seconds between a stream's updates: smooth to read, few web-server messages
    stream_timeout: float = 60.0  # seconds a running request may go without a token before it is an error


@dataclass(frozen=True)
class SpaceSettings:
    model_id: str = DEFAULT_MODEL_ID
    ref_model_id: str | None = None  # None: the adapter's base with the adapter off, or the recorded reference
    engine: EngineSettings = field(default_factory=lambda: EngineSettings(compile=True))  # the Space compiles
    queue_max_size: int = 16  # requests waiting beyond those running; more are told the Space is busy
    concurrency: int = 8  # requests Gradio runs at once: as many as the engine batches
    state_session_capacity: int = 64  # Gradio's per-session records (the endpoints keep no state)
    server_name: str = "127.0.0.1"
    server_port: int = 7860
    feedback_dir: str = str(ROOT / "feedback")  # the Arena's votes and the Chat tab's thumbs (SQLite)
    arena_min_seconds: float = 3.0  # a session's votes come at least this far apart
    feedback_repo: str | None = None  # a Hub dataset that feedback shards are pushed to (with HF_TOKEN)
    hf_token: str | None = field(default=None, repr=False)  # never in a log or a response
    malloc_trim_seconds: float = 60.0  # glibc's free arena pages handed back this often (memory.py); 0: never

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> SpaceSettings:
        env = os.environ if env is None else env
        read = _Reader(env)
        max_batch = read.integer("MAX_BATCH", 8, low=1)
        engine = EngineSettings(
            dtype=read.choice("DTYPE", "auto", DTYPES),
            decoder=read.choice("DECODER", "auto", DECODERS),
            compile=read.choice("DECODER_COMPILE", "1", ("0", "1")) == "1",
            compile_cache_dir=env.get("COMPILE_CACHE_DIR") or default_compile_cache_dir(env),
            max_batch=max_batch,
            max_input_tokens=read.integer("MAX_INPUT_TOKENS", 1024, low=1),
            stream_interval=read.number("STREAM_INTERVAL", 0.1, low=0.0),
            stream_timeout=read.number("STREAM_TIMEOUT", 60.0, low=0.001),
        )
        return cls(
            model_id=env.get("MODEL_ID") or DEFAULT_MODEL_ID,
            ref_model_id=env.get("REF_MODEL_ID") or None,
            engine=engine,
            queue_max_size=read.integer("QUEUE_MAX_SIZE", 16, low=1),
            concurrency=read.integer("CONCURRENCY", max_batch, low=1),
            state_session_capacity=read.integer("STATE_SESSION_CAPACITY", 64, low=1),
            server_name=env.get("GRADIO_SERVER_NAME") or "127.0.0.1",
            server_port=read.integer("GRADIO_SERVER_PORT", 7860, low=1),
            feedback_dir=env.get("FEEDBACK_DIR") or default_feedback_dir(env),
            arena_min_seconds=read.number("ARENA_MIN_SECONDS", 3.0, low=0.0),
            feedback_repo=env.get("FEEDBACK_REPO") or None,
            hf_token=env.get("HF_TOKEN") or None,
            malloc_trim_seconds=read.number("MALLOC_TRIM_SECONDS", 60.0, low=0.0),
        )


class _Reader:
    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def _raw(self, name: str):
        value = self.env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self._raw(name) or default
        if value not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
        return value

    def integer(self, name: str, default: int, low: int) -> int:
        return self._number(name, default, low, int, f"an integer of at least {low}")

    def number(self, name: str, default: float, low: float) -> float:
        return self._number(name, default, low, float, f"a number of at least {low:g}")

    def _number(self, name: str, default, low, kind, wanted: str):
        value = self._raw(name)
        try:
            number = default if value is None else kind(value)
        except ValueError:
            number = None
        if number is None or not low <= number < float("inf"):  # nan fails every comparison
            raise ValueError(f"{name} must be {wanted}; got {value!r}")
        return number
