"""The CPU decoding path: ``LlamaDecoder`` (int4 weights in GGUF's Q4_1 layout, one compiled step, a KV-cache row
per request) and ``DecoderBackend``, its scheduler backend. The engine uses it by default on a CPU, for Llama
models; it gives the same greedy tokens as ``generate`` (``DECODER=fp32``, tests/test_serving.py).
"""

from __future__ import annotations

import functools
import logging

from dpo_space.cpu.backend import DecoderBackend

logger = logging.getLogger(__name__)

__all__ = ["DecoderBackend", "build_decoders", "compile_decoders"]


def build_decoders(policy, reference, choice: str, max_rows: int) -> dict | None:
    """``{use_reference: LlamaDecoder}`` for ``policy`` and ``reference`` (``LoadedModel``s; ``reference`` None:
    the policy with its adapter off, as ``scoring.reference_model``), or None to decode with ``generate``.

    ``choice``: ``auto`` (int4 where the decoder runs: a Llama on the CPU), ``generate``, ``int4`` or ``fp32``."""
    from dpo_space.cpu.decoder import WEIGHT_FORMATS, LlamaDecoder, supports

    if choice not in ("auto", "generate", *WEIGHT_FORMATS):
        raise ValueError(f"DECODER must be auto, generate, {' or '.join(WEIGHT_FORMATS)}; got {choice!r}")
    models = [m.model for m in (policy, reference) if m is not None]
    reason = next(filter(None, map(supports, models)), None)
    if choice == "generate" or (choice == "auto" and reason):
        logger.info("Decoding with generate%s", f" ({reason})" if reason and choice == "auto" else "")
        return None
    if reason:
        raise ValueError(f"DECODER={choice} cannot run this model: {reason}; use DECODER=generate")
    weight_format = "int4" if choice == "auto" else choice
    build = functools.partial(LlamaDecoder, weight_format=weight_format, max_rows=max_rows)
    policy_decoder = build(models[0])
    reference_decoder = build(models[1]) if reference is not None else policy_decoder.without_adapter()
    logger.info("Decoding with %s LlamaDecoders", weight_format)
    return {False: policy_decoder, True: reference_decoder}


def compile_decoders(decoders: dict) -> bool:
    """Compile each decoder's step (``LlamaDecoder.compile``; it switches over when ready). A failure (no C++
    compiler, say) is logged and leaves them decoding eagerly; returns whether they compiled."""
    policy, reference = decoders[False], decoders[True]
    try:
        seconds = policy.compile()
        if reference.layers is not policy.layers:  # a separate reference model; a view shares the policy's
            seconds += reference.compile()
    except Exception:
        logger.exception("Compiling the decoders failed; they go on decoding eagerly")
        return False
    logger.info("Compiled the decoders in %.0f s", seconds)
    return True
