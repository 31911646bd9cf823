"""What visitors say about the replies, kept durably: Arena votes (two anonymous replies, one preferred) and the Chat
tab's thumbs. One SQLite file in ``FEEDBACK_DIR`` (WAL, one writer, every vote committed before it is
acknowledged), a versioned schema migrated on open, and no personal data: a session appears only as a salted hash.

``python -m train.feedback export OUT`` turns the file into TRL datasets for the next round of training. With
``FEEDBACK_REPO`` and a token set, ``HubSync`` also pushes each process's append-only shard of votes (JSON lines,
never the live database) to a Hub dataset every few minutes and once more at shutdown.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FILE = "feedback.sqlite3"
VOTES = ("A", "B", "tie", "both_bad")
VOTE_COLUMNS = ("round_id", "voted_at", "session", "policy_model", "reference_model", "adapter_hash", "policy_side",
                "settings", "conversation", "reply_a", "reply_b", "vote")  # fmt: skip
THUMB_COLUMNS = ("rated_at", "session", "model", "adapter_hash", "conversation", "reply", "liked")
MIGRATIONS = [  # schema version i + 1 is MIGRATIONS[i] applied to version i; never edit one that has shipped
    """
    CREATE TABLE votes (
        round_id TEXT PRIMARY KEY,
        voted_at REAL NOT NULL,
        session TEXT NOT NULL,          -- a salted hash, never the session id itself
        policy_model TEXT NOT NULL,
        reference_model TEXT NOT NULL,
        adapter_hash TEXT NOT NULL,     -- the content hash of the adapter's weights (or of the full model's)
        policy_side TEXT NOT NULL CHECK (policy_side IN ('A', 'B')),
        settings TEXT NOT NULL,         -- JSON: the sampling settings, the seed among them
        conversation TEXT NOT NULL,     -- JSON: the messages both replies answer
        reply_a TEXT NOT NULL,
        reply_b TEXT NOT NULL,
        vote TEXT NOT NULL CHECK (vote IN ('A', 'B', 'tie', 'both_bad'))
    );
    CREATE TABLE thumbs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rated_at REAL NOT NULL,
        session TEXT NOT NULL,
        model TEXT NOT NULL,
        adapter_hash TEXT NOT NULL,
        conversation TEXT NOT NULL,     -- JSON: the messages before the reply
        reply TEXT NOT NULL,
        liked INTEGER NOT NULL CHECK (liked IN (0, 1))
    );
    """,
    """
    CREATE INDEX votes_by_session_time ON votes (session, voted_at);
    """,
]


@dataclass(frozen=True)
class Vote:
    round_id: str
    session: str
    policy_model: str
    reference_model: str
    adapter_hash: str
    policy_side: str
    settings: dict
    conversation: list[dict]
    reply_a: str
    reply_b: str
    vote: str


class FeedbackStore:
    """The feedback file, opened (created and migrated if need be) once per process; safe to call from threads."""

    def __init__(self, folder: str | Path, salt: str, sync: HubSync | None = None):
        self.path = Path(folder) / FILE
        self.sync = sync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.salt = salt
        self._lock = threading.Lock()  # one writer
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a vote acknowledged is on disk, even after kill -9
        migrate(self._db)

    def session_hash(self, session_id: str) -> str:
        return hashlib.sha256(f"{self.salt}:{session_id}".encode()).hexdigest()[:32]

    def add_vote(self, vote: Vote) -> None:
        """Store one vote, committed before this returns; a round votes once (``ValueError`` after that)."""
        if vote.vote not in VOTES:
            raise ValueError(f"a vote must be one of {', '.join(VOTES)}; got {vote.vote!r}")
        row = (vote.round_id, time.time(), vote.session, vote.policy_model, vote.reference_model, vote.adapter_hash,
               vote.policy_side, json.dumps(vote.settings), json.dumps(vote.conversation), vote.reply_a, vote.reply_b,
               vote.vote)  # fmt: skip
        with self._lock:
            try:
                self._db.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError:
                raise ValueError("this round has its vote already; start a new round") from None
        if self.sync is not None:
            self.sync.append("votes", dict(zip(VOTE_COLUMNS, row, strict=True)))

    def add_thumb(self, session: str, model: str, adapter_hash: str, conversation: list[dict], reply: str,
                  liked: bool) -> None:  # fmt: skip
        row = (time.time(), session, model, adapter_hash, json.dumps(conversation), reply, int(liked))
        with self._lock:
            self._db.execute(
                "INSERT INTO thumbs (rated_at, session, model, adapter_hash, conversation, reply, liked) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )
        if self.sync is not None:
            self.sync.append("thumbs", dict(zip(THUMB_COLUMNS, row, strict=True)))

    def votes_since(self, session: str, seconds: float) -> int:
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM votes WHERE session = ? AND voted_at > ?",
                                        (session, time.time() - seconds)).fetchone()  # fmt: skip
        return count

    def scoreboard(self) -> dict:
        """Votes so far: the DPO model's wins over its reference with a 95% Wilson interval, ties, both bad."""
        from dpo_space.stats import wilson_interval

        with self._lock:
            rows = self._db.execute("SELECT policy_side, vote FROM votes").fetchall()
        wins = sum(vote == side for side, vote in rows)
        losses = sum(vote in ("A", "B") and vote != side for side, vote in rows)
        low, high = wilson_interval(wins, wins + losses)
        return {"votes": len(rows), "dpo_wins": wins, "reference_wins": losses,
                "dpo_win_rate": wins / (wins + losses) if wins + losses else None, "ci95": [low, high],
                "ties": sum(vote == "tie" for _, vote in rows),
                "both_bad": sum(vote == "both_bad" for _, vote in rows)}  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()


def load_salt(folder: str | Path) -> str:
    """The folder's own random salt for session hashes, made once and kept beside the data (readable by its owner
    only): a session hashes the same after a restart, and the hash says nothing without the salt."""
    path = Path(folder) / "salt"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "x") as f:  # only the first process to get here writes it
            f.write(secrets.token_hex(16))
        path.chmod(0o600)
    except FileExistsError:
        pass
    return path.read_text().strip()


def migrate(db: sqlite3.Connection) -> int:
    """Bring the file to the newest schema, one version at a time, each in one transaction; return the version."""
    (version,) = db.execute("PRAGMA user_version").fetchone()
    if version > len(MIGRATIONS):
        raise ValueError(f"the feedback file has schema version {version}, newer than this code knows "
                         f"({len(MIGRATIONS)}): update the Space, or point FEEDBACK_DIR elsewhere")  # fmt: skip
    for number in range(version, len(MIGRATIONS)):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, MIGRATIONS[number].split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {number + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        logger.info("Feedback schema migrated to version %d", number + 1)
    return len(MIGRATIONS)


def read_rows(path: str | Path) -> tuple[list[dict], list[dict]]:
    """Every vote and every thumb in a feedback file, as dicts (JSON columns decoded), read-only."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no feedback file at {path}: pass the FEEDBACK_DIR of a Space, or its {FILE}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    db.row_factory = sqlite3.Row
    try:
        votes = [dict(r) for r in db.execute("SELECT * FROM votes ORDER BY voted_at")]
        thumbs = [dict(r) for r in db.execute("SELECT * FROM thumbs ORDER BY id")]
    finally:
        db.close()
    for row in votes:
        row["settings"], row["conversation"] = json.loads(row["settings"]), json.loads(row["conversation"])
    for row in thumbs:
        row["conversation"] = json.loads(row["conversation"])
    return votes, thumbs


class HubSync:
    """Each stored vote and thumb, appended to this process's own shard (``shards/<kind>-<process>.jsonl``), which
    ``huggingface_hub.CommitScheduler`` pushes to the dataset ``repo_id`` every ``minutes``, and once more from its
    own exit handler when the process ends (``app.py`` turns a Space's SIGTERM into a clean exit for it)."""

    def __init__(self, folder: str | Path, repo_id: str, token: str, minutes: float = 5):
        from huggingface_hub import CommitScheduler

        self.shards = Path(folder) / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.process = secrets.token_hex(6)
        self.scheduler = CommitScheduler(repo_id=repo_id, repo_type="dataset", folder_path=self.shards, every=minutes,
                                         path_in_repo="data", private=True, token=token)  # fmt: skip

    def append(self, kind: str, row: dict) -> None:
        with self.scheduler.lock:  # not while a commit reads the shard
            with open(self.shards / f"{kind}-{self.process}.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")


def start_hub_sync(folder: str | Path, repo_id: str | None, token: str | None) -> HubSync | None:
    """A ``HubSync`` when both a dataset repository and a token are set; else None, said once in the log. A Hub that
    cannot be reached is logged (never the token) and feedback stays local."""
    if not repo_id or not token:
        logger.info("Feedback stays in %s: set FEEDBACK_REPO and HF_TOKEN to push it to a Hub dataset", folder)
        return None
    try:
        sync = HubSync(folder, repo_id, token)
    except Exception as e:  # noqa: BLE001 - offline, a wrong repository, a token without write access
        logger.error("Feedback stays local: pushing to the Hub dataset %s failed (%s)", repo_id, type(e).__name__)
        return None
    logger.info("Feedback is pushed to the Hub dataset %s every few minutes", repo_id)
    return sync
