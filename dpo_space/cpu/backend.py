"""The CPU decoder's backend for the scheduler: each request has its own KV-cache row in a ``LlamaDecoder``, so
one that arrives is prefilled alone and decodes with the running rows from the next step, with no restart, and a
finished row leaves at once."""

from __future__ import annotations

from dpo_space.request import Request
from dpo_space.sampling import pick_token, row_processors

PACK_TOKENS = 1024  # prompts that arrive together are prefilled together up to this many tokens a pass


def packs(requests: list, budget: int) -> list[list]:
    """``requests`` in order, grouped so that each group's prompts hold at most ``budget`` tokens (or are one)."""
    groups, size = [], budget
    for request in requests:
        if size + len(request.prompt_ids) > budget:
            groups.append([])
            size = 0
        groups[-1].append(request)
        size += len(request.prompt_ids)
    return groups


class DecoderBackend:
    """Runs batches on ``decoder_for(use_reference)``, a ``LlamaDecoder`` (the policy's, or the reference's, each
    with a cache of its own). A batch may hold requests for both: each step decodes the policy's rows, then the
    reference's, so that Compare and the Arena stream both replies at once."""

    mixes_models = True  # the scheduler lets a request for either model join a running batch

    def __init__(self, decoder_for, lock, eos_ids: list[int]):
        self.decoder_for = decoder_for
        self.lock = lock  # one batch or scoring at a time
        self.eos_ids = eos_ids

    def run(self, batch: list[Request], scheduler) -> None:
        """Decode until every row is finished; arrivals join at the next step. ``batch`` grows in place, so a
        failure reaches every request that joined."""
        import torch

        rows: dict[bool, list[Request]] = {False: [], True: []}  # by use_reference, in each cache's row order
        decoders = {use_reference: self.decoder_for(use_reference) for use_reference in rows}
        new = list(batch)
        processors: dict[int, list] = {}  # by id(request)
        with self.lock:
            for decoder in decoders.values():
                decoder.reset()
            while new or rows[False] or rows[True]:
                for request in new:
                    request.start()
                    request.generator = torch.Generator().manual_seed(request.settings.seed)
                    processors[id(request)] = row_processors(request.settings)
                for use_reference, own in rows.items():
                    decoder = decoders[use_reference]
                    arrivals = [r for r in new if r.use_reference == use_reference]
                    for group in packs(arrivals, PACK_TOKENS):  # arrivals together: one pass through the weights
                        logits = decoder.prefill_rows([r.prompt_ids for r in group])
                        own += group
                        self._advance(group, logits, processors)
                running = len(rows[False]) + len(rows[True])
                if new:
                    scheduler.batch_sizes.append(running)
                for use_reference, own in rows.items():
                    decoder = decoders[use_reference]
                    self._retire(decoder, own)
                    if own:
                        self._advance(own, decoder.decode([r.generated[-1] for r in own]), processors)
                        self._retire(decoder, own)
                new = scheduler.joining(None, len(rows[False]) + len(rows[True]))
                batch += new

    def _advance(self, rows: list[Request], logits, processors: dict[int, list]) -> None:
        """Pick each row's next token from ``logits`` [rows, vocab] and stream it; EOS, the budget or a stop
        finishes its request."""
        import torch

        chosen = logits.argmax(dim=-1).tolist()
        for i, request in enumerate(rows):
            if request.stopped:
                request.finish()
                continue
            own = processors[id(request)]
            if own:
                ids = torch.tensor([request.prompt_ids + request.generated])
                chosen[i] = pick_token(request, own, ids, logits[i])
            if chosen[i] in self.eos_ids:
                request.finish()
                continue
            request.emit(chosen[i])
            if request.should_end:
                request.finish()

    @staticmethod
    def _retire(decoder, rows: list[Request]) -> None:
        """Free the finished rows' cache rows (the last row moves into a freed one, in both) and those asked to
        stop."""
        for i in reversed(range(len(rows))):
            request = rows[i]
            if request.stopped:
                request.finish()
            if request.finished:
                decoder.remove_row(i)
                rows[i] = rows[-1]
                rows.pop()
