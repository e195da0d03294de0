"""The conversation log: every finished turn in ``data_dir()/logs.db`` (SQLite, WAL, FTS5).

Logging never costs a reply: a database that cannot be opened or written gives one warning
and logging is off for the rest of the run.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmchat.paths import data_dir

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 10_000
TITLE_CHARS = 60


def db_path() -> Path:
    return data_dir() / "logs.db"


def off_flag() -> Path:
    return data_dir() / "logs-off"


def enabled() -> bool:
    return not off_flag().exists()


def set_enabled(on: bool) -> None:
    flag = off_flag()
    if on:
        flag.unlink(missing_ok=True)
    else:
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.write_text("logging is off: `llmchat logs on` turns it back on\n")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


V1 = """
CREATE TABLE conversations (id TEXT PRIMARY KEY, name TEXT, model TEXT, created_utc TEXT);
CREATE TABLE responses (
    id TEXT PRIMARY KEY, conversation_id TEXT REFERENCES conversations(id), model TEXT,
    prompt TEXT, system TEXT, response TEXT, options TEXT, prompt_tokens INTEGER,
    completion_tokens INTEGER, duration_ms INTEGER, datetime_utc TEXT);
"""
V1_TO_V2 = """
ALTER TABLE conversations ADD COLUMN model_path TEXT;
ALTER TABLE conversations ADD COLUMN options TEXT;
ALTER TABLE conversations ADD COLUMN updated_utc TEXT;
UPDATE conversations SET updated_utc = created_utc;
ALTER TABLE responses ADD COLUMN finish_reason TEXT;
ALTER TABLE responses ADD COLUMN image TEXT;
ALTER TABLE responses ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS responses_conv ON responses(conversation_id, datetime_utc);
CREATE VIRTUAL TABLE responses_fts USING fts5(
    prompt, response, content='responses', content_rowid='rowid', tokenize='trigram');
INSERT INTO responses_fts(rowid, prompt, response) SELECT rowid, prompt, response FROM responses;
CREATE TRIGGER responses_ai AFTER INSERT ON responses BEGIN
    INSERT INTO responses_fts(rowid, prompt, response) VALUES (new.rowid, new.prompt, new.response);
END;
CREATE TRIGGER responses_ad AFTER DELETE ON responses BEGIN
    INSERT INTO responses_fts(responses_fts, rowid, prompt, response)
    VALUES ('delete', old.rowid, old.prompt, old.response);
END;
"""
MIGRATIONS = {0: V1, 1: V1_TO_V2}


class LogError(Exception):
    pass


def connect(path: Path | None = None) -> sqlite3.Connection:
    """Open (creating and migrating) the log; LogError when it is not a usable database."""
    path = path or db_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        setup(db)
        return db
    except sqlite3.DatabaseError as exc:
        raise LogError(
            f"{path} is not a usable log ({exc}); logging is off for this run "
            f"(move it aside, e.g. `mv {path} {path}.bad`, to start a new log)"
        ) from None
    except OSError as exc:
        raise LogError(f"cannot open {path} ({exc.strerror or exc}); logging is off for this "
                       "run") from None


def setup(db: sqlite3.Connection) -> None:
    """WAL mode and the schema. Two processes creating the file at once can get "database is
    locked" here without SQLite's busy handler ever waiting (switching the journal mode takes
    an exclusive lock), so this step retries on its own for up to the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    delay = 0.01
    while True:
        try:
            if db.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                db.execute("PRAGMA journal_mode = WAL")
            migrate(db)
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.2)


def migrate(db: sqlite3.Connection) -> None:
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version} is newer than this llmchat")
    while version < SCHEMA_VERSION:
        db.execute("BEGIN IMMEDIATE")
        try:
            current = db.execute("PRAGMA user_version").fetchone()[0]
            if current == version:  # another process may have migrated meanwhile
                for stmt in statements(MIGRATIONS[version]):
                    db.execute(stmt)
                db.execute(f"PRAGMA user_version = {version + 1}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        version = db.execute("PRAGMA user_version").fetchone()[0]


def statements(script: str) -> list[str]:
    out, buf = [], ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            out.append(buf.strip())
            buf = ""
    return out


def warn(msg: str) -> None:
    print(f"warning: {' '.join(msg.split())}", file=sys.stderr, flush=True)


class Logger:
    """Writes one conversation's turns; after the first failure it warns once and stops."""

    def __init__(self, *, model: str, model_path: str | None, options: dict[str, Any],
                 conversation_id: str | None = None) -> None:
        self.model, self.model_path, self.options = model, model_path, options
        self.conversation_id = conversation_id
        self.db: sqlite3.Connection | None = None
        self.broken = False

    def _open(self) -> sqlite3.Connection | None:
        if self.broken:
            return None
        if self.db is None:
            try:
                self.db = connect()
            except LogError as exc:
                self.broken = True
                warn(str(exc))
        return self.db

    def log(self, conversation_id: str, prompt: str, system: str | None, response: str,
            stats: Any, config: dict[str, Any], image: str | None = None,
            interrupted: bool = False) -> None:
        db = self._open()
        if db is None:
            return
        ts = now()
        opts = {**self.options, **config, "system": system}
        try:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id FROM conversations WHERE id = ?",
                             (conversation_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO conversations (id, name, model, model_path, options, "
                    "created_utc, updated_utc) VALUES (?,?,?,?,?,?,?)",
                    (conversation_id, " ".join(prompt.split())[:TITLE_CHARS], self.model,
                     self.model_path, json.dumps(opts, ensure_ascii=False), ts, ts))
            else:
                db.execute("UPDATE conversations SET updated_utc = ?, options = ?, "
                           "model_path = COALESCE(?, model_path) WHERE id = ?",
                           (ts, json.dumps(opts, ensure_ascii=False), self.model_path,
                            conversation_id))
            db.execute(
                "INSERT INTO responses (id, conversation_id, model, prompt, system, response, "
                "options, prompt_tokens, completion_tokens, finish_reason, duration_ms, "
                "datetime_utc, image, interrupted) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (uuid.uuid4().hex, conversation_id, self.model, prompt, system, response,
                 json.dumps(config, ensure_ascii=False), stats.prompt_tokens,
                 stats.completion_tokens, stats.finish_reason,
                 round(stats.total_s * 1000), ts, image, int(interrupted)))
            db.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.broken = True
            warn(f"cannot write the conversation log {db_path()} ({exc}); logging is off for "
                 "this run")


# -- reading -------------------------------------------------------------------------------
def open_existing() -> sqlite3.Connection | None:
    return connect() if db_path().exists() else None


def latest_conversation(db: sqlite3.Connection) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM conversations ORDER BY updated_utc DESC, rowid DESC "
                      "LIMIT 1").fetchone()


def get_conversation(db: sqlite3.Connection, cid: str) -> sqlite3.Row | None:
    return db.execute("SELECT * FROM conversations WHERE id = ?", (cid,)).fetchone()


def turns(db: sqlite3.Connection, cid: str) -> list[sqlite3.Row]:
    return db.execute("SELECT * FROM responses WHERE conversation_id = ? AND interrupted = 0 "
                      "ORDER BY datetime_utc, rowid", (cid,)).fetchall()


def responses(db: sqlite3.Connection, *, n: int, query: str | None = None,
              cid: str | None = None) -> list[dict[str, Any]]:
    where, args = [], []
    if cid:
        where.append("r.conversation_id = ?")
        args.append(cid)
    if query:
        if len(query) >= 3:
            phrase = '"' + query.replace('"', '""') + '"'
            where.append("r.rowid IN (SELECT rowid FROM responses_fts WHERE responses_fts "
                         "MATCH ?)")
            args.append(phrase)
        else:
            where.append("(r.prompt LIKE ? ESCAPE '\\' OR r.response LIKE ? ESCAPE '\\')")
            pat = "%" + query.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            args += [pat, pat]
    sql = "SELECT r.* FROM responses r"
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " ORDER BY r.datetime_utc DESC, r.rowid DESC LIMIT ?"
    rows = db.execute(sql, [*args, n]).fetchall()
    out = []
    for r in reversed(rows):
        d = dict(r)
        d["options"] = json.loads(d["options"] or "{}")
        d["interrupted"] = bool(d["interrupted"])
        out.append(d)
    return out


def conversations(db: sqlite3.Connection, n: int) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT c.*, (SELECT COUNT(*) FROM responses r WHERE r.conversation_id = c.id) AS turns "
        "FROM conversations c ORDER BY updated_utc DESC LIMIT ?", (n,)).fetchall()
    return [dict(r) for r in rows]


# -- what `llmchat logs` prints -------------------------------------------------------------------
def status_text(db: sqlite3.Connection | None, path: Path) -> str:
    """``llmchat logs status``: on/off, the file, its counts and size on disk (WAL included)."""
    n_conv = n_resp = 0
    if db is not None:
        n_conv = db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
        n_resp = db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*")
               if p.is_file()) if path.parent.exists() else 0
    return (f"Logging: {'on' if enabled() else 'off'}\nFile: {path}\n"
            f"Conversations: {n_conv}\nResponses: {n_resp}\nSize: {size:,} bytes")


def conversation_line(r: dict[str, Any]) -> str:
    """One ``llmchat logs list`` line."""
    return f"{r['id']}  {r['updated_utc']}  {r['model']}  {r['turns']} turn(s)  {r['name']}"


def responses_markdown(rows: list[dict[str, Any]]) -> str:
    """Logged turns as Markdown, one section each (``llmchat logs``)."""
    parts = []
    for r in rows:
        parts.append(f"## {r['datetime_utc']} · {r['model']} · conversation "
                     f"{r['conversation_id']}\n\n**Prompt:**\n\n{r['prompt']}\n\n"
                     f"**Response:**\n\n{r['response']}\n")
    return "\n".join(parts)
