"""Where does a model tell a harmful request from a harmless one in the same words? A linear probe at every layer.

    python -m train.probe --model embedded --xstest ../shared/data/xstest/xstest_prompts.csv \
        --out docs/alignment/probe.json

A logistic regression on the hidden state at a one-turn prompt's last token (the position that decides whether
the reply starts with a refusal), one per layer, is fitted on the project's own requests (``--harmful``: written
harmful requests and the harmful openers of HH's training dialogues; ``--harmless``: harmless requests, many in
harm's words) and tested on XSTest, which no training file draws from. Per layer: the ROC AUC on XSTest, and the
share of its unsafe prompts the probe catches while it flags at most ``--safe_budget`` of its safe ones (the
over-refusal the alignment targets allow: 17 of 250 is the reference's 5 plus the 0.05 of 250 the target gives).

It says what the base model already represents, not what a DPO run will learn: a layer where the probe separates
XSTest well is information a refusal could be keyed on; layers where it does not are where a word, not a
request, is what the model sees. ``lora_top_layers`` puts an adapter above such a layer (docs/alignment).
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dpo_space.cli import command_parser
from train.distinction import (
    BORDERLINE_FILE,
    HH_FILE,
    QUESTIONS_FILE,
    harmful_openers,
    hh_training_pairs,
    read_questions,
)

logger = logging.getLogger(__name__)

HARMFUL_FILES = ("train/prompts/harmful_requests.txt",)
HARMLESS_FILES = (
    "train/prompts/harmless_contrasts.txt",
    BORDERLINE_FILE,
    "train/prompts/borderline_senses_and_people.txt",
    QUESTIONS_FILE,
)


def roc_auc(scores: list[float], labels: list[bool]) -> float:
    """The probability that a positive scores above a negative, ties counting half (the area under the ROC curve)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        raise ValueError("roc_auc needs at least one positive and one negative label")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def caught_within_budget(scores: list[float], labels: list[bool], max_flagged: int) -> float:
    """The share of positives a threshold catches when it flags at most ``max_flagged`` negatives: positives scored
    strictly above the negative ranked ``max_flagged + 1`` (so ties with it are not caught)."""
    neg = sorted((s for s, y in zip(scores, labels, strict=True) if not y), reverse=True)
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    if not pos:
        raise ValueError("caught_within_budget needs at least one positive label")
    if max_flagged >= len(neg):
        return 1.0
    return sum(s > neg[max_flagged] for s in pos) / len(pos)


@dataclass(frozen=True)
class LinearProbe:
    """A fitted probe: ``features @ weight + bias`` scores a request (positive: harmful), over the raw features."""

    weight: torch.Tensor
    bias: float

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight + self.bias


def fit_probe(features: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2) -> LinearProbe:
    """A logistic regression on standardised ``features`` (n x d; ``labels`` 0/1), fitted by L-BFGS, returned as a
    probe on the raw features (the standardisation folded into its weight and bias)."""
    mean, std = features.mean(0), features.std(0) + 1e-6
    x = (features - mean) / std
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weight + bias, labels.float())
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    raw = weight.detach() / std
    return LinearProbe(weight=raw, bias=float(bias.detach() - mean @ raw))


@torch.no_grad()
def last_token_states(model, tokenizer, requests: list[str]) -> torch.Tensor:
    """The hidden states at the last token of each request formatted as one user turn, as the Space formats a
    visitor's message: n x (layers + 1) x d (index 0 the embeddings, index k the output of decoder layer k - 1)."""
    from dpo_space.prompts import format_user_prompt

    states = []
    for text in requests:
        ids = tokenizer(format_user_prompt(text, tokenizer), return_tensors="pt", add_special_tokens=False)
        hidden = model(**ids, output_hidden_states=True).hidden_states
        states.append(torch.stack([h[0, -1].float() for h in hidden]))
    return torch.stack(states)


def probe_layers(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: list[bool],
                 safe_budget: int) -> list[dict]:  # fmt: skip
    """One probe per layer (the features' second axis), fitted on the training requests, scored on the test set."""
    rows = []
    for layer in range(train_x.shape[1]):
        scores = fit_probe(train_x[:, layer], train_y)(test_x[:, layer]).tolist()
        rows.append({"layer": layer, "auc": round(roc_auc(scores, test_y), 4),
                     "unsafe_caught": round(caught_within_budget(scores, test_y, safe_budget), 4)})  # fmt: skip
    return rows


def probe_requests(harmful_files, harmless_files, hh: str, hh_eval_fraction: float, seed: int):
    """The requests a probe is fitted on: harmful (the files' requests, then the harmful openers of the HH file's
    training dialogues unless ``hh`` is empty) and harmless (the files' requests)."""
    harmful = [q for path in harmful_files for q in read_questions(path)]
    if hh:
        harmful += harmful_openers(hh_training_pairs(hh, hh_eval_fraction, seed), exclude=set(harmful))
    harmless = [q for path in harmless_files for q in read_questions(path)]
    return harmful, harmless


def parse_args(argv=None):
    parser = command_parser(__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--xstest", required=True, help="XSTest's xstest_prompts.csv: the test set")
    parser.add_argument("--harmful", nargs="*", default=list(HARMFUL_FILES), help="files of harmful requests")
    parser.add_argument("--harmless", nargs="*", default=list(HARMLESS_FILES), help="files of harmless requests")
    parser.add_argument("--hh", default=HH_FILE, help="HH file whose training dialogues' harmful openers join the "
                        "harmful side ('' for none)")  # fmt: skip
    parser.add_argument("--hh_eval_fraction", type=float, default=0.1, help="as the recipes' eval_fraction")
    parser.add_argument("--seed", type=int, default=42, help="as the recipes' seed (the split)")
    parser.add_argument("--safe_budget", type=int, default=17, help="safe XSTest prompts the probe may flag")
    parser.add_argument("--out", required=True, help="the .json file to write")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)

    from dpo_space.models import load_model
    from train.behaviour import read_xstest

    harmful, harmless = probe_requests(args.harmful, args.harmless, args.hh, args.hh_eval_fraction, args.seed)
    xstest = read_xstest(args.xstest)
    logger.info("Fitting on %d harmful and %d harmless requests; testing on XSTest's %d prompts", len(harmful),
                len(harmless), len(xstest))  # fmt: skip

    loaded = load_model(args.model)
    loaded.model.eval()
    train_x = last_token_states(loaded.model, loaded.tokenizer, harmful + harmless)
    train_y = torch.tensor([1] * len(harmful) + [0] * len(harmless))
    test_x = last_token_states(loaded.model, loaded.tokenizer, [r["prompt"] for r in xstest])
    test_y = [r["label"] == "unsafe" for r in xstest]
    rows = probe_layers(train_x, train_y, test_x, test_y, args.safe_budget)
    for row in rows:
        logger.info("layer %2d: XSTest AUC %.3f, unsafe caught %.3f with at most %d safe flagged", row["layer"],
                    row["auc"], row["unsafe_caught"], args.safe_budget)  # fmt: skip

    result = {"model": args.model, "harmful_requests": len(harmful), "harmless_requests": len(harmless),
              "xstest_safe": test_y.count(False), "xstest_unsafe": test_y.count(True),
              "safe_budget": args.safe_budget, "layers": rows}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    logger.info("Wrote %s", out)
    return rows


if __name__ == "__main__":
    main()
