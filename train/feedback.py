"""Turn the Space's stored feedback into TRL datasets for the next round of DPO.

    python -m train.feedback export OUT [--feedback_dir feedback]

writes ``OUT/preferences.jsonl``: one row per Arena vote that preferred a side, in TRL's conversational
preference format (``prompt`` messages, ``chosen`` and ``rejected`` assistant messages; ties, both-bad votes and
votes with an empty reply are left out and counted), which ``train.dpo`` trains on like any other dataset
(``--dataset_name OUT/preferences.jsonl --eval_fraction 0``, alone or beside HH in a recipe); and
``OUT/unpaired.jsonl``: one row per thumb on a Chat reply, in TRL's unpaired preference format (``prompt``,
``completion``, ``label``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dpo_space.cli import command_parser
from dpo_space.feedback import FILE, read_rows

logger = logging.getLogger(__name__)


def preference_rows(votes: list[dict]) -> tuple[list[dict], dict]:
    """Votes -> TRL conversational preference rows, and the count of votes left out by kind."""
    rows, left_out = [], {"tie": 0, "both_bad": 0, "empty_reply": 0}
    for vote in votes:
        replies = {"A": vote["reply_a"], "B": vote["reply_b"]}
        if vote["vote"] in left_out:
            left_out[vote["vote"]] += 1
            continue
        if not all(reply.strip() for reply in replies.values()):  # nothing to learn a reply's tokens from
            left_out["empty_reply"] += 1
            continue
        loser = "B" if vote["vote"] == "A" else "A"
        rows.append({
            "prompt": vote["conversation"],
            "chosen": [{"role": "assistant", "content": replies[vote["vote"]]}],
            "rejected": [{"role": "assistant", "content": replies[loser]}],
            "round_id": vote["round_id"],
            "chosen_model": vote["policy_model"] if vote["vote"] == vote["policy_side"] else vote["reference_model"],
        })  # fmt: skip
    return rows, left_out


def unpaired_rows(thumbs: list[dict]) -> list[dict]:
    return [{"prompt": t["conversation"], "completion": [{"role": "assistant", "content": t["reply"]}],
             "label": bool(t["liked"])} for t in thumbs]  # fmt: skip


def read_feedback(feedback: Path) -> tuple[list[dict], list[dict]]:
    """Votes and thumbs from a Space's ``FEEDBACK_DIR`` (its SQLite file), the file itself, or a folder of the
    shards it pushes to the Hub (``votes-*.jsonl`` and ``thumbs-*.jsonl``, as a dataset snapshot holds them)."""
    if feedback.is_dir() and not (feedback / FILE).is_file():
        shards = sorted(feedback.rglob("votes-*.jsonl")), sorted(feedback.rglob("thumbs-*.jsonl"))
        if not any(shards):
            raise ValueError(f"{feedback} holds no {FILE} and no votes-*.jsonl shards")
        votes, thumbs = ([json.loads(line) for path in paths for line in path.read_text().splitlines() if line]
                         for paths in shards)  # fmt: skip
        for row in votes:
            row["settings"], row["conversation"] = json.loads(row["settings"]), json.loads(row["conversation"])
        for row in thumbs:
            row["conversation"] = json.loads(row["conversation"])
        return sorted(votes, key=lambda v: v["voted_at"]), thumbs
    return read_rows(feedback / FILE if feedback.is_dir() else feedback)


def export(feedback: Path, out: Path) -> dict:
    """Write both files; return what was written and left out."""
    votes, thumbs = read_feedback(feedback)
    preferences, left_out = preference_rows(votes)
    unpaired = unpaired_rows(thumbs)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("preferences.jsonl", preferences), ("unpaired.jsonl", unpaired)):
        (out / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
    summary = {"votes": len(votes), "preferences": len(preferences), "left_out": left_out, "thumbs": len(unpaired)}
    logger.info("Exported %s to %s", summary, out)
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = command_parser(__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    export_args = commands.add_parser("export", help="write preferences.jsonl and unpaired.jsonl")
    export_args.add_argument("out", type=Path)
    where = "the Space's FEEDBACK_DIR, its feedback.sqlite3, or a folder of pushed shards"
    export_args.add_argument("--feedback_dir", type=Path, default=Path("feedback"), help=where)
    args = parser.parse_args(argv)
    try:
        return export(args.feedback_dir, args.out)
    except ValueError as e:
        parser.exit(2, f"train.feedback: error: {e}\n")


if __name__ == "__main__":
    main()
