"""Each row's own sampling, the same for both decoding paths: its penalties and warpers, then its seeded draw."""

from __future__ import annotations


def row_processors(settings) -> list:
    """``settings``' logits processors, in ``generate``'s own order; empty for plain greedy."""
    from transformers import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = []
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.temperature > 0:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    return processors


def pick_token(request, processors: list, input_ids, scores) -> int:
    """A row's next token: its processors on ``scores`` [vocab], then its seeded sample (or the argmax)."""
    import torch

    row = scores[None].float()
    for processor in processors:
        row = processor(input_ids, row)
    if request.settings.temperature > 0:
        return int(torch.multinomial(torch.softmax(row[0], dim=-1), 1, generator=request.generator)[0])
    return int(row[0].argmax())
