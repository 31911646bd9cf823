"""The NLL term (``loss_type: [..., sft]``) on the chosen replies of some sources only, as a ``DPOTrainer`` subclass.

TRL's ``sft`` term trains on every pair's chosen reply. HH harmless-base's chosen replies are short and evasive
("I don't know how to help you."): imitated on every HH pair, they teach the over-refusal that DPO is meant to avoid
(docs/alignment), while PandaLM's chosen replies are the everyday answers worth imitating. With
``nll_sources: [helpful]`` the preference term still learns from every pair, the NLL term from the helpful ones only.

Each training row carries an ``nll_weight`` (1.0 where its source is listed, else 0.0); the trainer scales the
``sft`` term of a batch by its rows' mean weight. That is exact per pair when a device's batch holds one pair (the
recipes' ``per_device_train_batch_size: 1``); a batch mixing sources gets the share of its pairs that carry the term.
"""

from __future__ import annotations

import contextlib

SOURCES = ("hh", "helpful", "extra")
WEIGHT_KEY = "nll_weight"


def nll_weights(sources: list[str]) -> dict[str, float] | None:
    """Each source's weight on the NLL term; None when every source has it (TRL's own loss, no column added)."""
    unknown = sorted(set(sources) - set(SOURCES))
    if unknown:
        raise ValueError(f"nll_sources: unknown source(s) {unknown}; use some of {list(SOURCES)}")
    if set(sources) == set(SOURCES):
        return None
    return {source: float(source in sources) for source in SOURCES}


def nll_by_source_trainer(trainer_class):
    """A subclass of ``trainer_class`` (TRL's ``DPOTrainer`` or a subclass) that reads each batch's ``nll_weight``."""

    class NLLBySourceDPOTrainer(trainer_class):
        """Overrides ``compute_loss`` (scales the ``sft`` term's weight for this batch, restored after) and
        ``compute_ref_log_probs`` (the weight is not a model input); collates ``nll_weight`` beside TRL's keys."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            weighted = WEIGHT_KEY in (getattr(self.train_dataset, "column_names", None) or [])
            if weighted and self.args.remove_unused_columns:
                raise ValueError("nll_sources needs remove_unused_columns: false (the Trainer would drop each pair's "
                                 f"{WEIGHT_KEY} and put the NLL term on every pair)")  # fmt: skip
            collate = self.data_collator

            def collate_with_weights(examples):
                batch = collate(examples)
                if WEIGHT_KEY in examples[0]:
                    import torch

                    batch[WEIGHT_KEY] = torch.tensor([float(e[WEIGHT_KEY]) for e in examples])
                return batch

            self.data_collator = collate_with_weights

        @contextlib.contextmanager
        def nll_scaled(self, inputs: dict):
            weights = inputs.pop(WEIGHT_KEY, None)
            if weights is None:
                yield
                return
            original = self.loss_weights
            scale = float(weights.float().mean())
            pairs = zip(self.loss_types, original, strict=True)
            self.loss_weights = [w * scale if t == "sft" else w for t, w in pairs]
            try:
                yield
            finally:
                self.loss_weights = original

        def compute_loss(self, model, inputs, *args, **kwargs):
            with self.nll_scaled(inputs):
                return super().compute_loss(model, inputs, *args, **kwargs)

        def compute_ref_log_probs(self, model, inputs):
            inputs = {k: v for k, v in inputs.items() if k != WEIGHT_KEY}
            return super().compute_ref_log_probs(model, inputs)

    return NLLBySourceDPOTrainer
