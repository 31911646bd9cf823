"""Distinction pairs: refuse the harmful request, answer the harmless one, the refusals in the model's own words.

    python -m train.distinction --out outputs/distinction/pairs-questions.jsonl
    python -m train.distinction --out outputs/distinction/pairs-openers.jsonl --harmful_openers \
        --questions train/prompts/everyday_questions.txt train/prompts/borderline_questions.txt
    python -m train.distinction --out outputs/distinction/pairs-named.jsonl --harmful_openers --named_refusals \
        --questions train/prompts/everyday_questions.txt train/prompts/borderline_questions.txt
    python -m train.distinction --out outputs/distinction/pairs-requests.jsonl --prompt_files_only \
        --harmful_requests train/prompts/harmful_requests.txt --questions train/prompts/harmless_contrasts.txt

DPO on HH's pairs taught this project's small model one move, a refusal for everything or for nothing
(docs/alignment): HH's two replies rarely differ in whether they refuse. These pairs do, on both sides of the line:

- **harmful**: the HH training dialogues whose human-preferred reply refuses and whose other reply does not (the
  judgement says refusing was right). Chosen: a refusal decoded by the model itself after the prefix "I'm sorry, but
  I can't", cut after its first sentence ("I'm sorry, but I can't provide the home address for Senator Rand
  Paul."). Rejected: the model's own greedy reply when it complies, else HH's rejected reply.
- **harmless**: as many distinct PandaLM training instructions (everyday tasks; chosen: the human-preferred reply),
  and everyday questions written for this project (``train/prompts/everyday_questions.txt``; chosen: the model's
  own greedy answer, when it does not refuse or loop), because PandaLM's instructions are tasks ("Rewrite the
  sentence ...") and a model taught on them alone learns that a question is what to refuse. Rejected: the model's
  refusal, decoded the same way.
- with ``--harmful_openers``, also the harmful requests that open HH's training dialogues, as one-turn prompts
  (``harmful_request``), because the evaluations ask in one turn and a model taught on whole red-team dialogues
  learns to refuse those; and ``--questions`` may also name ``train/prompts/borderline_questions.txt``, harmless
  requests in harm's words ("How do I kill a frozen program?"), so that a word is not what marks a request.
- with ``--named_refusals``, the chosen refusal of a harmful request names the harm it declines
  (``train.refusals.named_refusal``: "I'm sorry, but I can't help with poisoning anyone. It could seriously hurt or
  kill them."), where the request names one of the listed harms; the model's own refusal otherwise.
- ``--harmful_requests`` names files of one-turn harmful requests written for this project
  (``train/prompts/harmful_requests.txt``), paired as the openers are; with ``--prompt_files_only`` only the written
  files are read, to write pairs that a recipe mixes in beside an earlier file.

Only the training splits are read (HH's and PandaLM's held-out pairs are those ``train.dpo`` keeps back, with the
same fractions and seed); XSTest stays out. Greedy decoding, so the file is the same on every run. It is written in
TRL's conversational preference format, which a recipe mixes in with ``extra_dataset_files``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from dpo_space.cli import command_parser

logger = logging.getLogger(__name__)

REFUSAL_PREFIX = "I'm sorry, but I can't"
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


def first_sentence(text: str) -> str:
    """``text`` up to and including its first sentence end (``.``, ``!`` or ``?`` before a space or the end); the
    whole stripped text when it has none."""
    text = text.strip()
    end = _SENTENCE_END.search(text)
    return text[: end.end()] if end else text


def refusal_reply(continuation: str, prefix: str = REFUSAL_PREFIX) -> str:
    """The refusal a model wrote after ``prefix``: the prefix and the rest of its first sentence."""
    rest = continuation.strip()
    if not rest or rest[0] in ".!?,;":
        return first_sentence(prefix + rest) if rest else prefix + "."
    return first_sentence(f"{prefix} {rest}")


def one_turn(text: str) -> list[dict]:
    """``text`` as a conversation of one user turn."""
    return [{"role": "user", "content": text}]


def preference_row(messages: list[dict], chosen: str, rejected: str, kind: str) -> dict:
    """One row in TRL's conversational preference format; ``kind`` (harmful or harmless) is kept for counting."""
    return {"prompt": messages, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}], "kind": kind}  # fmt: skip


def harmful_dialogues(pairs: list[tuple[list[dict], str, str]]) -> list[tuple[list[dict], str]]:
    """The ``(messages, rejected reply)`` of the pairs whose chosen reply refuses and whose rejected reply does not,
    by ``train.behaviour.is_refusal``."""
    from train.behaviour import is_refusal

    return [(messages, rejected) for messages, chosen, rejected in pairs
            if is_refusal(chosen) and not is_refusal(rejected)]  # fmt: skip


_REQUEST = re.compile(
    r"\b(how (do|can|could|would|should|to) (i|we|you|one)|where (can|do|could) i|what('s| is) the (best|easiest) way"
    r"|help me|teach me|tips)\b", re.I)  # fmt: skip
_HARM = re.compile(
    r"\b(steal|stole|kill|poison|hurt|drug|bomb|hack|rob|robb|cheat|murder|weapon|gun|break into|sneak|scam|illegal"
    r"|cocaine|heroin|meth|revenge|attack|tortur|kidnap|kidnapp|shoplift|launder|counterfeit|burn|stab|stabb|shoot"
    r"|get away with|fake|lie to|spy|blackmail|bully|harass|punch|sabotag|smuggl|forg|trespass|vandal\w*|abus"
    r"|threaten)(s|es|e|ed|ing|er|ers|ery)?\b", re.I)  # fmt: skip
_NOT_HARM = re.compile(r"\b(avoid|prevent|protect|stop|spot|tell if)\b", re.I)


def harmful_request(text: str, max_chars: int = 200) -> bool:
    """Whether an HH red-team opener asks, in one short turn, how to do something harmful: a request ("how do I",
    "where can I", "help me", ...) and a harm word ("steal", "poison", "hack", ...), and no word of prevention.

    A selector of training prompts from HH's red-team dialogues, where nearly every such request means harm; not a
    classifier for anyone's prompts (it would refuse "How do I kill a process?")."""
    return (len(text) <= max_chars and bool(_REQUEST.search(text)) and bool(_HARM.search(text))
            and not _NOT_HARM.search(text))  # fmt: skip


def harmful_openers(pairs: list[tuple[list[dict], str, str]], exclude: set[str] = frozenset()) -> list[str]:
    """The distinct first human turns of ``pairs`` that are ``harmful_request``s, in order, ``exclude`` left out."""
    seen, out = set(exclude), []
    for messages, _, _ in pairs:
        text = messages[0]["content"].strip()
        if text not in seen and harmful_request(text):
            seen.add(text)
            out.append(text)
    return out


def harmful_row(messages: list[dict], refusal: str, own_reply: str, hh_rejected: str = "") -> dict | None:
    """Refusal over compliance: the model's own reply when it complies, else HH's rejected reply; None when the
    decoded refusal is not one (the prefix made it, so only an empty continuation could fail) or when there is no
    compliance to reject (the model refuses and no HH reply is given)."""
    from train.behaviour import is_refusal

    if not is_refusal(refusal):
        return None
    rejected = own_reply if own_reply.strip() and not is_refusal(own_reply) else hh_rejected
    return preference_row(messages, refusal, rejected, "harmful") if rejected.strip() else None


def harmless_row(messages: list[dict], answer: str, refusal: str) -> dict:
    """Answer over refusal, on a harmless request."""
    return preference_row(messages, answer, refusal, "harmless")


def first_per_instruction(pairs: list[dict]) -> list[dict]:
    """The first of each instruction's PandaLM pairs (the file judges several reply pairs per instruction)."""
    seen, out = set(), []
    for pair in pairs:
        key = pair["messages"][-1]["content"]
        if key not in seen:
            seen.add(key)
            out.append(pair)
    return out


HH_FILE = "../shared/data/hh-rlhf/harmless-base-test.sample2000.jsonl.gz"  # the recipes' dataset_name
QUESTIONS_FILE = "train/prompts/everyday_questions.txt"
BORDERLINE_FILE = "train/prompts/borderline_questions.txt"  # harmless requests that sound harmful


def read_questions(path: str | Path) -> list[str]:
    """One question a line; blank lines and lines starting with ``#`` left out."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def usable_answer(reply: str, max_repeated: float = 0.1) -> bool:
    """An answer worth preferring and imitating: not empty, not a refusal, at most ``max_repeated`` of its word
    4-grams repeated."""
    from train.behaviour import is_refusal, repeated_ngram_share

    return bool(reply.strip()) and not is_refusal(reply) and repeated_ngram_share(reply.split(), 4) <= max_repeated


def hh_training_pairs(hh_path: str, hh_eval_fraction: float, seed: int) -> list:
    """HH's training pairs as ``(messages, chosen, rejected)``, split as ``train.dpo`` splits them."""
    from train.data import parsed_pairs, read_jsonl, split_train_eval

    hh_train, _ = split_train_eval(list(read_jsonl(hh_path)), hh_eval_fraction, seed)
    return parsed_pairs(hh_train, hh_path, skip_bad_rows=True)[0]  # the rows train.dpo keeps with skip_bad_rows


def training_pairs(hh_path: str, hh_eval_fraction: float, pandalm_path: str, pandalm_eval_fraction: float,
                   seed: int) -> tuple[list, list]:  # fmt: skip
    """HH's training pairs (``hh_training_pairs``) and PandaLM's training pairs (``pandalm_pair`` dicts), split as
    ``train.dpo`` splits them."""
    from train.data import pandalm_pairs, read_json_list, split_train_eval

    pandalm_train, _ = split_train_eval(pandalm_pairs(read_json_list(pandalm_path)), pandalm_eval_fraction, seed)
    return hh_training_pairs(hh_path, hh_eval_fraction, seed), pandalm_train


def parse_args(argv=None):
    parser = command_parser(__doc__)
    parser.add_argument("--out", required=True, help="the .jsonl file to write")
    parser.add_argument("--model", default="embedded", help="the model whose own words the pairs use (the base)")
    parser.add_argument("--hh", default=HH_FILE)
    parser.add_argument("--hh_eval_fraction", type=float, default=0.1, help="as the recipe's eval_fraction")
    parser.add_argument("--helpful", default="../shared/data/pandalm/testset-v1.json.gz")
    parser.add_argument("--helpful_eval_fraction", type=float, default=0.2, help="as the recipe's")
    parser.add_argument(
        "--questions",
        nargs="*",
        default=[QUESTIONS_FILE],
        help="files of harmless questions, one a line (none: PandaLM's instructions alone)",
    )
    parser.add_argument(
        "--harmful_openers",
        action="store_true",
        help="also the harmful requests that open HH's training dialogues, as one-turn prompts",
    )
    parser.add_argument(
        "--harmful_requests",
        nargs="*",
        default=[],
        help="files of one-turn harmful requests, one a line (train/prompts/harmful_requests.txt)",
    )
    parser.add_argument(
        "--prompt_files_only",
        action="store_true",
        help="only the requests of --harmful_requests and --questions: no HH dialogue, no PandaLM instruction "
        "(pairs to mix in beside an earlier file)",
    )
    parser.add_argument(
        "--named_refusals",
        action="store_true",
        help="chosen refusals of harmful requests name the harm they decline (train/refusals.py), where they can",
    )
    parser.add_argument("--seed", type=int, default=42, help="as the recipe's seed (the splits)")
    parser.add_argument("--max_new_tokens", type=int, default=96, help="for the model's own replies")
    args = parser.parse_args(argv)
    if args.prompt_files_only and args.harmful_openers:
        parser.error("--harmful_openers reads HH's training dialogues, which --prompt_files_only leaves out: drop one")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)

    from dpo_space.engine import Engine
    from dpo_space.prompts import format_prompt
    from train.evaluate import generate_replies
    from train.refusals import named_refusal

    harmful, harmless = [], []  # (messages, HH's rejected reply or "") and PandaLM pairs
    if not args.prompt_files_only:
        hh, pandalm = training_pairs(args.hh, args.hh_eval_fraction, args.helpful, args.helpful_eval_fraction,
                                     args.seed)  # fmt: skip
        harmful = harmful_dialogues(hh)
        harmless = first_per_instruction(pandalm)[: len(harmful)]
        logger.info("%d harmful HH dialogues (of %d training pairs), %d harmless PandaLM instructions", len(harmful),
                    len(hh), len(harmless))  # fmt: skip
        if args.harmful_openers:
            asked_alone = {messages[0]["content"].strip() for messages, _ in harmful if len(messages) == 1}
            openers = harmful_openers(hh, exclude=asked_alone)
            logger.info("%d more harmful requests from the openers of HH's training dialogues", len(openers))
            harmful += [(one_turn(text), "") for text in openers]  # no HH reply to reject
    for path in args.harmful_requests:
        requests = read_questions(path)
        logger.info("%s: %d harmful requests", path, len(requests))
        harmful += [(one_turn(text), "") for text in requests]

    engine = Engine.load(args.model)
    tok = engine.tokenizer
    harmful_prompts = [format_prompt(messages, tok) for messages, _ in harmful]
    harmless_prompts = [format_prompt(pair["messages"], tok) for pair in harmless]

    def refusals(prompts):
        continuations = generate_replies(engine, [p + REFUSAL_PREFIX for p in prompts], "greedy", False, 40, 0)
        return [refusal_reply(c["text"]) for c in continuations]

    own = generate_replies(engine, harmful_prompts, "greedy", False, args.max_new_tokens, 0)
    named = [named_refusal(messages) if args.named_refusals else None for messages, _ in harmful]
    if args.named_refusals:
        logger.info("%d of %d harmful requests get a refusal that names their harm", sum(map(bool, named)), len(named))
    own_words = iter(refusals([prompt for prompt, name in zip(harmful_prompts, named, strict=True) if name is None]))
    harmful_refusals = [name or next(own_words) for name in named]  # the model decodes only those not named
    rows = [
        harmful_row(messages, refusal, reply["text"], rejected)
        for (messages, rejected), refusal, reply in zip(harmful, harmful_refusals, own, strict=True)
    ]
    rows = [r for r in rows if r is not None]
    rows += [harmless_row(pair["messages"], pair["chosen"], refusal)
             for pair, refusal in zip(harmless, refusals(harmless_prompts), strict=True)]  # fmt: skip
    for path in args.questions:
        questions = [one_turn(q) for q in read_questions(path)]
        prompts = [format_prompt(messages, tok) for messages in questions]
        answers = [a["text"] for a in generate_replies(engine, prompts, "greedy", False, args.max_new_tokens, 0)]
        usable = [i for i, answer in enumerate(answers) if usable_answer(answer)]
        logger.info("%s: %d of %d answered without refusing or looping", path, len(usable), len(answers))
        rows += [harmless_row(questions[i], answers[i], refusal)
                 for i, refusal in zip(usable, refusals([prompts[i] for i in usable]), strict=True)]  # fmt: skip

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    counts = {kind: sum(r["kind"] == kind for r in rows) for kind in ("harmful", "harmless")}
    logger.info("Wrote %d pairs to %s: %s", len(rows), out, counts)
    return rows


if __name__ == "__main__":
    main()
