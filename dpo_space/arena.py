"""The Arena's rounds: two anonymous replies to one prompt, the DPO model and its reference on random sides, one vote
per round once both replies have finished, then the names. Votes go to the ``FeedbackStore``; rounds in flight live
in memory only (a vote is the only thing worth keeping).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from dpo_space.feedback import VOTES, FeedbackStore, Vote

MAX_OPEN_ROUNDS = 2048  # rounds kept in memory (voted ones too, to say so); the oldest are forgotten beyond this


@dataclass
class Round:
    id: str
    session: str  # the salted hash
    policy_side: str  # "A" or "B"
    conversation: list[dict]
    settings: dict
    replies: dict = field(default_factory=lambda: {"A": "", "B": ""})
    finished: bool = False
    voted: bool = False

    def side_of(self, use_reference: bool) -> str:
        return self.policy_side if not use_reference else ("B" if self.policy_side == "A" else "A")


class Arena:
    def __init__(self, store: FeedbackStore, policy_model: str, reference_model: str, adapter_hash: str,
                 min_seconds_between_votes: float):  # fmt: skip
        self.store = store
        self.policy_model, self.reference_model, self.adapter_hash = policy_model, reference_model, adapter_hash
        self.min_seconds = min_seconds_between_votes
        self._rounds: OrderedDict[str, Round] = OrderedDict()
        self._last_vote: dict[str, float] = {}
        self._lock = threading.Lock()

    def start(self, session_id: str, conversation: list[dict], settings: dict) -> Round:
        round_ = Round(id=secrets.token_hex(8), session=self.store.session_hash(session_id),
                       policy_side=secrets.choice("AB"), conversation=conversation, settings=settings)  # fmt: skip
        with self._lock:
            self._rounds[round_.id] = round_
            while len(self._rounds) > MAX_OPEN_ROUNDS:
                self._rounds.popitem(last=False)
        return round_

    def vote(self, round_id: str, session_id: str, choice: str) -> dict:
        """Store the vote of ``round_id``'s own session; return the names. A ``ValueError`` says why a vote is
        refused: an unknown or already-voted round, replies still coming, or votes faster than a person's."""
        if choice not in VOTES:
            raise ValueError(f"the vote must be one of {', '.join(VOTES)}; got {choice!r}")
        session = self.store.session_hash(session_id)
        with self._lock:
            round_ = self._rounds.get(round_id) if isinstance(round_id, str) else None
            if round_ is None or round_.session != session:
                raise ValueError("unknown round: start a round, then vote on its replies")
            if round_.voted:
                raise ValueError("this round has its vote already; start a new round")
            if not round_.finished:
                raise ValueError("the replies are still coming: vote once both have finished")
            last = self._last_vote.get(session, 0.0)
            if time.monotonic() - last < self.min_seconds:
                raise ValueError(f"votes come faster than a person reads two replies: wait {self.min_seconds:g} s "
                                 f"between votes")  # fmt: skip
            round_.voted = True  # taken: a second click cannot store it twice
            self._last_vote[session] = time.monotonic()
        try:
            self.store.add_vote(Vote(round_.id, session, self.policy_model, self.reference_model, self.adapter_hash,
                                     round_.policy_side, round_.settings, round_.conversation, round_.replies["A"],
                                     round_.replies["B"], choice))  # fmt: skip
        except BaseException:
            round_.voted = False  # not stored: the visitor may try again
            raise
        names = {round_.policy_side: "the DPO model", round_.side_of(True): "the reference"}
        return {"A": names["A"], "B": names["B"], "scoreboard": self.store.scoreboard()}
