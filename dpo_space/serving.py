"""What the Space does with a model: validate settings, build prompts, stream generations, score replies.

``app.py`` only wires this to Gradio. Errors meant for users are ``ValueError``s whose text says what to do;
the app shows them with ``gr.Error``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from dpo_space.batching import END, Batcher, DecoderBatcher, Request
from dpo_space.models import LoadedModel, load_model
from dpo_space.prompts import format_response, format_user_prompt
from dpo_space.scoring import completion_logps, reference_label, reference_model

logger = logging.getLogger(__name__)

MODE_REPLY = "Assistant reply"
MODE_CONTINUE = "Continue text"
MODES = (MODE_REPLY, MODE_CONTINUE)
MAX_PROMPT_CHARS = 100_000  # a cap on every text field; longer input is refused before tokenizing
DEFAULT_BETA = 0.1


class GenerationError(RuntimeError):
    """The model failed while generating (raised in the consumer, with the cause chained)."""


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    integer: bool = False

    def check(self, name: str, value):
        if isinstance(value, bool) or not isinstance(value, int | float) or (self.integer and value != int(value)):
            kind = "an integer" if self.integer else "a number"
            raise ValueError(f"{name} must be {kind} in [{self.low:g}, {self.high:g}]; got {value!r}")
        if math.isnan(value) or not self.low <= value <= self.high:
            raise ValueError(f"{name} must be in [{self.low:g}, {self.high:g}]; got {value!r}")
        return int(value) if self.integer else float(value)


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling controls, as the UI's sliders and the API's parameters."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 0
    seed: int = 42

    RANGES = {
        "max_new_tokens": Range(1, 1024, integer=True),
        "temperature": Range(0.0, 2.0),
        "top_p": Range(0.01, 1.0),
        "top_k": Range(0, 200, integer=True),
        "repetition_penalty": Range(1.0, 2.0),
        "no_repeat_ngram_size": Range(0, 10, integer=True),
        "seed": Range(0, 2**31 - 1, integer=True),
    }

    @classmethod
    def validated(cls, **values) -> GenerationSettings:
        """Check each value against its range; a ``ValueError`` names the parameter and the range."""
        return cls(**{f.name: cls.RANGES[f.name].check(f.name, values[f.name]) for f in fields(cls)})

    def generate_kwargs(self) -> dict:
        sampling = self.temperature > 0
        kwargs = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": sampling,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy: unset the model's own sampling defaults so generate does not warn
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


@dataclass
class PreparedPrompt:
    input_ids: list[int]
    dropped_tokens: int  # tokens cut from the front to fit the input budget


def check_text(name: str, text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text; got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"{name} is empty: type something first")
    if len(text) > MAX_PROMPT_CHARS:
        raise ValueError(f"{name} is {len(text):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
    return text


def in_own_thread(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a thread that ends with it. A thread that runs parallel torch code keeps an
    OpenMP team (its worker threads) for as long as it lives; with more of them than cores, libgomp stops
    spinning between parallel regions and every team slows down: decoding ran at ~0.5x beside one idle team on
    2 cores. So the engine computes on the batcher's thread, or in threads that end, never in its caller's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="engine") as pool:  # leaving it joins the thread
        return pool.submit(fn, *args, **kwargs).result()


class Engine:
    """One policy model (and its reference) loaded once and shared by all requests."""

    def __init__(
        self, policy: LoadedModel, reference: LoadedModel | None, beta: float, max_input_tokens: int,
        decoder: str = "auto", compile: bool = False,
    ):  # fmt: skip
        self.policy = policy
        self.reference = reference  # None: the reference is the policy with its adapter disabled, or itself
        self.beta = beta
        self.max_input_tokens = max_input_tokens
        self.stream_timeout = float(os.environ.get("STREAM_TIMEOUT", "60"))
        # Updates per stream: 10 a second reads as smooth streaming, and each one costs the web server a message
        # (measured: no change in bench.serve's 8-user HTTP throughput, 74.7 vs 74.4 tok/s).
        self.stream_interval = float(os.environ.get("STREAM_INTERVAL", "0.1"))
        self.max_batch = int(os.environ.get("MAX_BATCH", "8"))
        self._lock = threading.Lock()  # one batch or scoring at a time: the adapter toggle is global to the model
        self._count_lock = threading.Lock()
        self._requests: set[Request] = set()
        self.decoders = in_own_thread(self._build_decoders, decoder)  # {use_reference: LlamaDecoder} or None
        self.compiled = threading.Event()  # set once the decoders decode single rows with their compiled step
        self.compiling = None
        if compile and self.decoders:
            self.compiling = threading.Thread(target=self._compile_decoders, name="compile-decoders", daemon=True)
            self.compiling.start()

    # --- loading ---

    @classmethod
    def load(
        cls,
        model_id: str,
        ref_model_id: str | None = None,
        dtype: str = "auto",
        decoder: str = "auto",
        compile: bool = False,
    ) -> Engine:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = pick_dtype(dtype, device)
        policy = in_own_thread(load_model, model_id, dtype=torch_dtype, device=device)
        ref_model_id = ref_model_id or recorded_reference(model_id)
        reference = in_own_thread(load_model, ref_model_id, dtype=torch_dtype, device=device) if ref_model_id else None
        max_input = int(os.environ.get("MAX_INPUT_TOKENS", "1024"))
        logger.info("Loaded %s (%s, %s); reference: %s", model_id, torch_dtype, device, ref_model_id or "shared")
        return cls(policy, reference, beta=recorded_beta(model_id), max_input_tokens=max_input, decoder=decoder,
                   compile=compile)  # fmt: skip

    def _build_decoders(self, choice: str) -> dict | None:
        """``auto``: int4 ``LlamaDecoder``s where they run (a Llama on the CPU), else ``generate``. An adapter's
        reference is the same decoder with the adapter off."""
        from dpo_space.decoder import WEIGHT_FORMATS, LlamaDecoder, supports

        if choice not in ("auto", "generate", *WEIGHT_FORMATS):
            raise ValueError(f"DECODER must be auto, generate, {' or '.join(WEIGHT_FORMATS)}; got {choice!r}")
        models = [m.model for m in (self.policy, self.reference) if m is not None]
        reason = next(filter(None, map(supports, models)), None)
        if choice == "generate" or (choice == "auto" and reason):
            logger.info("Decoding with generate%s", f" ({reason})" if reason and choice == "auto" else "")
            return None
        if reason:
            raise ValueError(f"DECODER={choice} cannot run this model: {reason}; use DECODER=generate")
        weight_format = "int4" if choice == "auto" else choice
        build = functools.partial(LlamaDecoder, weight_format=weight_format, max_rows=self.max_batch)
        policy = build(models[0])
        if self.reference is not None:
            reference = build(models[1])
        else:  # as scoring.reference_model: the base with the adapter off, or the policy itself
            reference = policy.without_adapter()
        logger.info("Decoding with %s LlamaDecoders", weight_format)
        return {False: policy, True: reference}

    def _compile_decoders(self) -> None:
        """In the background, while requests decode eagerly: each decoder switches to its compiled step when it
        is ready (``LlamaDecoder.compile``). A failure (no C++ compiler, say) leaves them eager."""
        policy, reference = self.decoders[False], self.decoders[True]
        try:
            seconds = policy.compile()
            if reference.layers is not policy.layers:  # a separate reference model; a view shares the policy's
                seconds += reference.compile()
        except Exception:
            logger.exception("Compiling the decoders failed; they go on decoding eagerly")
            return
        logger.info("Compiled the decoders in %.0f s", seconds)
        self.compiled.set()

    @property
    def decoder(self) -> str:
        return self.decoders[False].format if self.decoders else "generate"

    @property
    def tokenizer(self):
        return self.policy.tokenizer

    @property
    def reference_label(self) -> str:
        return reference_label(self.policy, self.reference)

    def info(self) -> dict:
        model = self.policy.model
        return {
            "model": self.policy.name,
            "base": self.policy.base,
            "adapter": self.policy.is_adapter,
            "reference": self.reference_label,
            "dtype": str(self.policy.dtype).removeprefix("torch."),
            "decoder": self.decoder,
            "compiled": self.compiled.is_set(),
            "device": str(self.policy.device),
            "parameters": sum(p.numel() for p in model.parameters()),
            "beta": self.beta,
            "max_input_tokens": self.max_input_tokens,
            "max_batch": self.max_batch,
            "active_generations": self.active_generations,
        }

    # --- prompts ---

    def prepare(self, text: str, mode: str, max_new_tokens: int) -> PreparedPrompt:
        check_text("prompt", text)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}")
        prompt = format_user_prompt(text, self.tokenizer) if mode == MODE_REPLY else text
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        context = getattr(self.policy.model.config, "max_position_embeddings", None) or 2048
        budget = max(1, min(self.max_input_tokens, context - max_new_tokens))
        return PreparedPrompt(input_ids=ids[-budget:], dropped_tokens=max(0, len(ids) - budget))

    # --- generation ---

    def stream(
        self, prompt: PreparedPrompt, settings: GenerationSettings, use_reference: bool = False
    ) -> Iterator[str]:
        """Yield the growing reply: the first token at once, then at most one update per ``stream_interval``
        seconds. Concurrent streams are batched together. Closing the iterator (Stop, a closed tab) ends this
        stream at the next token and leaves the others running."""
        request = Request(prompt.input_ids, settings, use_reference)
        with self._count_lock:  # forget finished requests here too, so the set stays small without /info calls
            self._requests = {r for r in self._requests if not r.finished.is_set()} | {request}
        self.batcher.submit(request)
        tokens, text = [], ""
        last_update = 0.0
        try:
            while True:
                if tokens:  # wake once per update, not once per token: the model's thread keeps the CPU
                    request.finished.wait(max(0.0, self.stream_interval - (time.monotonic() - last_update)))
                items = []
                while not request.tokens.empty():
                    items.append(request.tokens.get_nowait())
                if not items:
                    running = request.started.is_set()  # a batch that starts during this wait gets a whole one
                    try:
                        items = [request.tokens.get(timeout=self.stream_timeout)]
                    except queue.Empty:
                        if not running:
                            continue  # it was still waiting for its batch: the queue in front bounds that wait
                        raise GenerationError(
                            f"the model produced nothing for {self.stream_timeout:g} s; try again"
                        ) from None
                tokens += [item for item in items if isinstance(item, int)]
                if isinstance(items[-1], BaseException):
                    logger.error("generation failed", exc_info=items[-1])
                    raise GenerationError(
                        f"the model failed while generating ({type(items[-1]).__name__}); try again"
                    ) from items[-1]
                finished = items[-1] is END
                if not finished and time.monotonic() - last_update < self.stream_interval:
                    continue  # collect more tokens first: each update costs the web server a message
                decoded = self.tokenizer.decode(tokens, skip_special_tokens=True)
                if decoded != text and not decoded.endswith("\ufffd"):  # wait for a whole UTF-8 character
                    text, last_update = decoded, time.monotonic()
                    yield text
                if finished:
                    break
        finally:
            self.batcher.withdraw(request)

    @property
    def active_generations(self) -> int:
        """Requests the model is still working on (a stopped one counts until the model has let it go)."""
        with self._count_lock:
            self._requests = {r for r in self._requests if not r.finished.is_set()}
            return len(self._requests)

    @functools.cached_property
    def batcher(self) -> Batcher:
        tokenizer = self.tokenizer
        eos = self.policy.model.generation_config.eos_token_id
        eos_ids = [tokenizer.eos_token_id] + [i for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
        if self.decoders:
            return DecoderBatcher(self.decoders.__getitem__, self._lock, pad_id, list(dict.fromkeys(eos_ids)),
                                  self.max_batch, wait_s=0.01)  # fmt: skip
        return Batcher(self._reference_mode, self._lock, pad_id, list(dict.fromkeys(eos_ids)), self.max_batch,
                       wait_s=0.01)  # fmt: skip

    def _reference_mode(self, use_reference: bool):
        """A context giving the model to run: the policy, or its reference."""
        if not use_reference:
            if not self.decoders:  # generate decodes faster merged; scoring alone is one forward, not worth a merge
                self._merge_adapter()
            return contextlib.nullcontext(self.policy.model)
        return reference_model(self.policy, self.reference)

    @functools.cached_property
    def _mergeable_layers(self) -> list:
        """The LoRA layers of an fp32 adapter (none otherwise: bf16 merge/unmerge round trips drift the base)."""
        import torch

        if not self.policy.is_adapter or self.policy.dtype != torch.float32:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.policy.model.modules() if isinstance(m, BaseTunerLayer)]

    def _merge_adapter(self) -> None:
        """Fold the adapter into its base weights for the policy: decoding skips two small matmuls per layer
        (17.7 vs 15.6 tokens/s on the 2-core CPU, bench.levers). The reference stays one copy: with the adapter
        disabled, PEFT unmerges on the next forward, and the next policy request merges again."""
        layers = self._mergeable_layers
        if layers and not all(m.merged for m in layers):
            self.policy.model.merge_adapter()

    # --- scoring ---

    def implicit_reward(self, prompt_ids: list[int], reply: str) -> float:
        """DPO's implicit reward beta * (log pi(y|x) - log pi_ref(y|x)), the reply formatted and closed with EOS
        as in training."""
        reply_ids = self.tokenizer(
            format_response(reply, self.tokenizer) + self.tokenizer.eos_token, add_special_tokens=False
        )["input_ids"]
        logps = [in_own_thread(self._completion_logp, use_reference, prompt_ids, reply_ids) for use_reference in
                 (False, True)]  # fmt: skip
        return self.beta * (logps[0] - logps[1])

    def _completion_logp(self, use_reference: bool, prompt_ids: list[int], reply_ids: list[int]) -> float:
        with self._lock, self._reference_mode(use_reference) as model:
            return completion_logps(model, [(prompt_ids, reply_ids)])[0]


def pick_dtype(name: str, device: str):
    """``auto``: bf16 on CUDA; fp32 on CPU, where it decoded faster (21.5 vs 18.2 tokens/s, bench.levers)."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"DTYPE must be auto, float32, bfloat16 or float16; got {name!r}") from None


def _run_config(model_id: str) -> dict:
    path = Path(model_id) / "run_config.yaml"
    if not path.is_file():
        return {}
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def recorded_reference(model_id: str) -> str | None:
    """For a full model trained by ``train.dpo``: the model it started from (its DPO reference)."""
    if (Path(model_id) / "adapter_config.json").is_file():
        return None
    config = _run_config(model_id)
    return (config.get("script") or {}).get("ref_model_name_or_path") or (config.get("model") or {}).get(
        "model_name_or_path"
    )


def recorded_beta(model_id: str) -> float:
    return float((_run_config(model_id).get("training") or {}).get("beta", DEFAULT_BETA))


async def malformed_request(request, exc):
    """A 422 for a request body that does not parse. FastAPI's default echoes the input back, and fails with a
    500 when the input holds NaN or infinity."""
    from fastapi.responses import JSONResponse

    problems = [f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg', '')}" for e in exc.errors()]
    return JSONResponse({"error": "malformed request", "problems": problems}, status_code=422)
