"""HH-RLHF loading and conversion to DPO's prompt/chosen/rejected columns.

Rows come from the Hub (``Anthropic/hh-rlhf``, optional ``data_dir``) or from a local ``.jsonl`` /
``.jsonl.gz`` file, either in HH's original format (each row split at the last ``"\\n\\nAssistant:"``) or in
TRL's conversational preference format (``prompt`` messages, ``chosen`` and ``rejected`` assistant messages: what
``python -m train.feedback export`` writes from the Space's votes). Either is formatted with the same function the
Space uses (``dpo_space.prompts``).
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from dpo_space.prompts import format_prompt, format_response, hh_to_messages, split_hh_pair

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".jsonl", ".jsonl.gz")


@dataclass
class ConversionStats:
    """What happened to the rows: kept, and skipped by reason."""

    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def log(self, source: str) -> None:
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        logger.info("%s: kept %d pairs; skipped %d (%s)", source, self.kept, sum(self.skipped.values()), reasons)


def is_local_file(name: str) -> bool:
    return name.endswith(LOCAL_SUFFIXES)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict | str]]:
    """Yield ``(line_number, row)``; a line that is not a JSON object yields ``(n, error message)``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist; pass a .jsonl or .jsonl.gz file of HH-RLHF rows")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                yield n, f"not JSON ({e.msg})"
                continue
            yield n, row if isinstance(row, dict) else "not a JSON object"


def row_problem(row) -> str | None:
    """Why a row is not an HH pair (or a conversational preference pair), or None."""
    if isinstance(row, str):
        return row
    if isinstance(row.get("prompt"), list):
        for key in ("chosen", "rejected"):
            value = row.get(key)
            if not (
                isinstance(value, list)
                and value
                and isinstance(value[-1], dict)
                and value[-1].get("role") == "assistant"
                and isinstance(value[-1].get("content"), str)
            ):
                return f"{key!r} must be a list ending with an assistant message"  # fmt: skip
        return None
    for key in ("chosen", "rejected"):
        if not isinstance(row.get(key), str):
            return f"missing or non-string {key!r}"
    return None


def preference_parts(row: dict) -> tuple[list[dict], str, str]:
    """A checked row as (the prompt's messages, the chosen reply, the rejected reply)."""
    if isinstance(row.get("prompt"), list):
        from dpo_space.inputs import check_messages

        messages = check_messages(row["prompt"])
        if not messages or messages[-1]["role"] != "user":
            raise ValueError("the prompt must end with a user message")
        chosen, rejected = row["chosen"][-1]["content"].strip(), row["rejected"][-1]["content"].strip()
        if not chosen or not rejected:
            raise ValueError("empty chosen or rejected reply")
        return messages, chosen, rejected
    pair = split_hh_pair(row["chosen"], row["rejected"])
    return hh_to_messages(pair.prompt), pair.chosen, pair.rejected


def parsed_pairs(
    rows: Iterable[tuple[int, dict | str]],
    source: str,
    skip_bad_rows: bool = False,
) -> tuple[list[tuple[list[dict], str, str]], ConversionStats]:
    """HH rows -> ``(prompt messages, chosen reply, rejected reply)``. Identical pairs are always dropped (no signal)
    and counted.

    A bad row raises ``ValueError`` naming ``source`` and its row number, unless ``skip_bad_rows``.
    """
    out, stats = [], ConversionStats()
    for n, row in rows:
        problem = row_problem(row)
        if problem is None:
            try:
                messages, chosen, rejected = preference_parts(row)
            except ValueError as e:
                problem = str(e)
        if problem is not None:
            if not skip_bad_rows:
                raise ValueError(f"{source}, row {n}: {problem}. Fix the row or set skip_bad_rows: true.")
            stats.skipped[problem] += 1
            continue
        if chosen == rejected:
            stats.skipped["identical chosen and rejected replies"] += 1
            continue
        out.append((messages, chosen, rejected))
        stats.kept += 1
    return out, stats


def convert_rows(
    rows: Iterable[tuple[int, dict | str]],
    tokenizer,
    source: str,
    skip_bad_rows: bool = False,
) -> tuple[list[dict[str, str]], ConversionStats]:
    """HH rows -> formatted DPO rows (``parsed_pairs``, through the Space's prompt format)."""
    pairs, stats = parsed_pairs(rows, source, skip_bad_rows)
    stats.log(source)
    formatted = [
        {
            "prompt": format_prompt(messages, tokenizer),
            "chosen": format_response(chosen, tokenizer),
            "rejected": format_response(rejected, tokenizer),
        }
        for messages, chosen, rejected in pairs
    ]
    return formatted, stats


def load_hh_rows(name: str, data_dir: str | None = None, split: str = "train") -> Iterator[tuple[int, dict | str]]:
    """Numbered raw rows from a local file or the Hub."""
    if is_local_file(name):
        yield from read_jsonl(name)
        return
    from datasets import load_dataset

    dataset = load_dataset(name, data_dir=data_dir, split=split)
    yield from enumerate(dataset, start=1)


def split_train_eval(rows: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic shuffle-and-cut of one file into train and held-out rows."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1); got {eval_fraction}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = round(len(rows) * eval_fraction)
    eval_idx = set(order[:n_eval])
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    held_out = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, held_out


# --- PandaLM: human-judged pairs on everyday helpful tasks ---------------------------------------------------------

PANDALM_SUFFIXES = (".json", ".json.gz")


def read_json_list(path: str | Path) -> list:
    """A JSON file (optionally gzipped) that holds one list, e.g. PandaLM's ``testset-v1.json``."""
    path = Path(path)
    if not path.is_file() or not path.name.endswith(PANDALM_SUFFIXES):
        raise ValueError(f"helpful data file {str(path)!r} does not exist or is not .json / .json.gz; pass "
                         f"PandaLM's testset-v1.json(.gz)")  # fmt: skip
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of PandaLM items, got {type(items).__name__}")
    return items


def pandalm_verdict(item: dict) -> int | None:
    """1 or 2 when all three annotators prefer that response; None for ties, splits and malformed items."""
    labels = [item.get(f"annotator{i}") for i in (1, 2, 3)]
    if labels[0] in (1, 2) and labels.count(labels[0]) == 3:
        return labels[0]
    return None


def pandalm_pair(item: dict) -> dict | None:
    """A unanimous PandaLM item as chat messages and two replies, or None (no verdict, or an empty reply).

    The user turn is the instruction, then its optional input after a blank line, as Alpaca-style data reads."""
    verdict = pandalm_verdict(item)
    instruction = str(item.get("instruction") or "").strip()
    extra = str(item.get("input") or "").strip()
    replies = [str(item.get(f"response{i}") or "").strip() for i in (1, 2)]
    if verdict is None or not instruction or not all(replies) or replies[0] == replies[1]:
        return None
    user = f"{instruction}\n\n{extra}" if extra else instruction
    chosen, rejected = (replies[0], replies[1]) if verdict == 1 else (replies[1], replies[0])
    return {"messages": [{"role": "user", "content": user}], "chosen": chosen, "rejected": rejected}


def pandalm_pairs(items: list, stats: ConversionStats | None = None) -> list[dict]:
    """The usable PandaLM items as ``pandalm_pair`` dicts, in file order (the order every split is drawn from)."""
    stats = stats if stats is not None else ConversionStats()
    out = []
    for item in items:
        pair = pandalm_pair(item) if isinstance(item, dict) else None
        if pair is None:
            stats.skipped["not a unanimous verdict with two different replies"] += 1
            continue
        out.append(pair)
        stats.kept += 1
    return out


def convert_pandalm(items: list, tokenizer, source: str) -> list[dict[str, str]]:
    """PandaLM items -> formatted DPO rows (unanimous verdicts only), through the same formatting as HH rows."""
    stats = ConversionStats()
    pairs = pandalm_pairs(items, stats)
    stats.log(source)
    return [{"prompt": format_prompt(pair["messages"], tokenizer),
             "chosen": format_response(pair["chosen"], tokenizer),
             "rejected": format_response(pair["rejected"], tokenizer)} for pair in pairs]  # fmt: skip
