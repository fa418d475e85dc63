"""The journal: the durable record of every instance, association and study
state, in SQLite (WAL) next to the spool.

It is the source of truth of pacs-ai (DESIGN.md section 4): the broker may
lose a message, the journal may not. Several threads and several ingest
processes write to it; each thread has its own connection and every change
is one short ``BEGIN IMMEDIATE`` transaction.

Study lifecycle::

    RECEIVING -> COMPLETE -> QUEUED -> ANALYZED -> DELIVERED
                      \\-> IGNORED (no model matched)   FAILED(reason)
    late instances: COMPLETE/QUEUED/IGNORED -> RECEIVING;
                    ANALYZED/DELIVERED/FAILED -> SUPERSEDED -> RECEIVING

:data:`TRANSITIONS` is the one table of legal moves and :meth:`Journal.transition`
the one function that performs a move, records it in ``history`` and logs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from .uids import study_key as make_study_key

log = logging.getLogger(__name__)

RECEIVING = "RECEIVING"
COMPLETE = "COMPLETE"
QUEUED = "QUEUED"
ANALYZED = "ANALYZED"
DELIVERED = "DELIVERED"
IGNORED = "IGNORED"
FAILED = "FAILED"
SUPERSEDED = "SUPERSEDED"

STATES = (RECEIVING, COMPLETE, QUEUED, ANALYZED, DELIVERED, IGNORED, FAILED, SUPERSEDED)
TERMINAL_STATES = frozenset({DELIVERED, IGNORED, FAILED})

#: The legal moves of a study. ``None`` is "not in the journal yet".
#: A move to the same state (QUEUED -> QUEUED, ANALYZED -> ANALYZED) is a
#: retry: it counts an attempt.
TRANSITIONS: dict[str | None, frozenset[str]] = {
    None: frozenset({RECEIVING}),
    RECEIVING: frozenset({COMPLETE, FAILED}),
    COMPLETE: frozenset({QUEUED, IGNORED, FAILED, RECEIVING}),
    QUEUED: frozenset({QUEUED, ANALYZED, IGNORED, FAILED, RECEIVING}),
    ANALYZED: frozenset({ANALYZED, DELIVERED, FAILED, SUPERSEDED}),
    DELIVERED: frozenset({SUPERSEDED}),
    IGNORED: frozenset({RECEIVING}),
    FAILED: frozenset({QUEUED, ANALYZED, SUPERSEDED, RECEIVING}),
    SUPERSEDED: frozenset({RECEIVING}),
}

#: States a late instance moves out of, and where to (before RECEIVING).
_REOPEN_VIA = {
    COMPLETE: None,
    QUEUED: None,
    IGNORED: None,
    ANALYZED: SUPERSEDED,
    DELIVERED: SUPERSEDED,
    FAILED: SUPERSEDED,
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    study_key TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    reason TEXT,
    run INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    calling_ae TEXT,
    peer_host TEXT,
    modalities TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    received_bytes INTEGER NOT NULL DEFAULT 0,
    duplicates INTEGER NOT NULL DEFAULT 0,
    duplicate_conflicts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    run_started_at REAL NOT NULL,
    first_received_at REAL,
    last_received_at REAL,
    updated_at REAL NOT NULL,
    model TEXT,
    model_version TEXT,
    outputs TEXT,
    predecessor_outputs TEXT,
    destination TEXT,
    destination_answer TEXT
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    modality TEXT,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    digest TEXT,
    received_at REAL NOT NULL,
    assoc_id TEXT
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_key);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_key TEXT NOT NULL,
    at REAL NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    run INTEGER NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS history_study ON history(study_key);
CREATE TABLE IF NOT EXISTS associations (
    assoc_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    calling_ae TEXT,
    called_ae TEXT,
    peer_host TEXT,
    peer_port INTEGER,
    opened_at REAL NOT NULL,
    closed_at REAL,
    outcome TEXT,
    instances INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS associations_open ON associations(closed_at);
CREATE TABLE IF NOT EXISTS assoc_studies (
    assoc_id TEXT NOT NULL,
    study_key TEXT NOT NULL,
    PRIMARY KEY (assoc_id, study_key)
);
CREATE INDEX IF NOT EXISTS assoc_studies_study ON assoc_studies(study_key);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_key TEXT NOT NULL,
    run INTEGER NOT NULL,
    at REAL NOT NULL,
    destination TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    seconds REAL,
    answer TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_study ON deliveries(study_key);
CREATE TABLE IF NOT EXISTS produced (
    sop_uid TEXT PRIMARY KEY,
    study_key TEXT NOT NULL,
    run INTEGER NOT NULL
);
"""


class JournalError(Exception):
    """The journal could not record something."""


class IllegalTransition(JournalError):
    """A state change that :data:`TRANSITIONS` does not allow."""


class UnknownStudy(JournalError):
    """No study with that key."""


@dataclass
class Study:
    """One study as the journal knows it (no patient data)."""

    study_key: str
    study_uid: str
    state: str
    reason: str | None
    run: int
    attempts: int
    calling_ae: str | None
    peer_host: str | None
    modalities: list[str]
    instance_count: int
    received_bytes: int
    duplicates: int
    duplicate_conflicts: int
    created_at: float
    run_started_at: float
    first_received_at: float | None
    last_received_at: float | None
    updated_at: float
    model: str | None = None
    model_version: str | None = None
    outputs: list[str] = field(default_factory=list)
    predecessor_outputs: list[str] = field(default_factory=list)
    destination: str | None = None
    destination_answer: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Study":
        d = dict(row)
        d["modalities"] = [m for m in (d["modalities"] or "").split(",") if m]
        d["outputs"] = json.loads(d["outputs"]) if d["outputs"] else []
        d["predecessor_outputs"] = (
            json.loads(d["predecessor_outputs"]) if d["predecessor_outputs"] else []
        )
        return cls(**d)


@dataclass(frozen=True)
class InstanceRecord:
    """What the SCP tells the journal about one stored instance."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str | None
    path: str
    size: int
    digest: str | None = None


@dataclass(frozen=True)
class RecordResult:
    study_key: str
    new: bool  # False: the SOP Instance UID was already journaled
    reopened: bool  # True: a late instance reopened the study


def _locked(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self: "Journal", *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class Journal:
    """Thread-safe access to the journal database (one connection per process)."""

    def __init__(self, path: Path | str, *, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.synchronous = synchronous
        self._lock = threading.RLock()
        self._connection: sqlite3.Connection | None = None
        self._pid = 0
        self._lock_file: int | None = None
        self._lock_pid = 0
        conn = self._conn()
        conn.executescript(SCHEMA)
        salt = self._meta("study_key_salt")
        if salt is None:
            with self._write(conn):
                conn.execute(
                    "INSERT OR IGNORE INTO meta(key, value) VALUES ('study_key_salt', ?)",
                    (secrets.token_hex(16),),
                )
            salt = self._meta("study_key_salt")
        self._salt = bytes.fromhex(salt or "")
        self._keys: dict[str, str] = {}
        try:
            os.chmod(self.path, 0o600)
        except OSError:
            pass

    # -- connections -------------------------------------------------------
    @property
    def _lock_fd(self) -> int:
        if self._lock_file is None or self._lock_pid != os.getpid():
            self._lock_file = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            self._lock_pid = os.getpid()
        return self._lock_file

    def _conn(self) -> sqlite3.Connection:
        """The process's one connection (opened again after a fork). Callers
        hold ``self._lock``: association threads come and go by the hundred,
        and a connection per thread would cost file descriptors each time."""
        if self._connection is None or self._pid != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._connection, self._pid = conn, os.getpid()
        return self._connection

    def close(self) -> None:
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None
            if self._lock_file is not None and self._lock_pid == os.getpid():
                os.close(self._lock_file)
            self._lock_file = None

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE ... COMMIT`` under an exclusive ``flock`` on
        ``journal.sqlite.lock``: one writer at a time across every process.

        SQLite alone would do, but a writer that finds the database locked
        polls with sleeps of 1, 2, 5, 10... ms; with four ingest processes
        journaling every instance that added milliseconds to each C-STORE.
        A waiter on ``flock`` is woken the moment the lock is released.
        """
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @_locked
    def _meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @_locked
    def set_meta(self, key: str, value: str) -> None:
        conn = self._conn()
        with self._write(conn):
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        return self._meta(key)

    def study_key(self, study_uid: str) -> str:
        key = self._keys.get(study_uid)
        if key is None:
            if len(self._keys) > 4096:
                self._keys.clear()
            key = self._keys[study_uid] = make_study_key(study_uid, self._salt)
        return key

    # -- studies -----------------------------------------------------------
    def _transition(
        self,
        conn: sqlite3.Connection,
        key: str,
        current: str | None,
        to_state: str,
        run: int,
        reason: str | None,
        now: float,
    ) -> None:
        if to_state not in TRANSITIONS.get(current, frozenset()):
            raise IllegalTransition(f"study {key}: {current} -> {to_state} is not allowed")
        conn.execute(
            "INSERT INTO history(study_key, at, from_state, to_state, run, reason) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (key, now, current, to_state, run, reason),
        )
        log.info(
            "study %s %s -> %s%s",
            key,
            current or "NEW",
            to_state,
            f" ({reason})" if reason else "",
            extra={"study_key": key},
        )

    @_locked
    def transition(
        self,
        key: str,
        to_state: str,
        reason: str | None = None,
        *,
        expect_state: str | Iterable[str] | None = None,
        expect_run: int | None = None,
        **fields: Any,
    ) -> Study:
        """Move a study to ``to_state``: the one way a state changes.

        ``expect_state``/``expect_run`` make the move conditional (a task for
        an older run of a reopened study must not overwrite the new run).
        ``fields`` updates other columns (attempts, model, outputs, ...).
        Moving to the state the study is already in counts an attempt.
        """
        conn = self._conn()
        now = time.time()
        with self._write(conn):
            row = conn.execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
            if row is None:
                raise UnknownStudy(f"no study {key}")
            current = row["state"]
            if expect_state is not None:
                allowed = {expect_state} if isinstance(expect_state, str) else set(expect_state)
                if current not in allowed:
                    raise IllegalTransition(
                        f"study {key} is {current}, expected {'/'.join(sorted(allowed))}"
                    )
            if expect_run is not None and row["run"] != expect_run:
                raise IllegalTransition(f"study {key} is at run {row['run']}, not {expect_run}")
            self._transition(conn, key, current, to_state, row["run"], reason, now)
            updates = dict(fields)
            if to_state == current and "attempts" not in updates:
                updates["attempts"] = row["attempts"] + 1
            for json_col in ("outputs", "predecessor_outputs"):
                if json_col in updates and not isinstance(updates[json_col], str):
                    updates[json_col] = json.dumps(list(updates[json_col]))
            updates.update(state=to_state, reason=reason, updated_at=now)
            cols = ", ".join(f"{c} = ?" for c in updates)
            conn.execute(
                f"UPDATE studies SET {cols} WHERE study_key = ?", (*updates.values(), key)
            )
            row = conn.execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
        return Study.from_row(row)

    def _reopen(self, conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> None:
        """A late instance for a study past RECEIVING: start a new run."""
        key, current, run = row["study_key"], row["state"], row["run"]
        via = _REOPEN_VIA[current]
        extra: dict[str, Any] = {}
        if via is not None:
            self._transition(conn, key, current, via, run, "late instance", now)
            extra["predecessor_outputs"] = row["outputs"]
            current = via
        self._transition(conn, key, current, RECEIVING, run + 1, "late instance", now)
        conn.execute(
            "UPDATE studies SET state = ?, reason = NULL, run = ?, attempts = 0, "
            "run_started_at = ?, updated_at = ?"
            + (", predecessor_outputs = ?, outputs = NULL" if extra else "")
            + " WHERE study_key = ?",
            (RECEIVING, run + 1, now, now, *extra.values(), key),
        )

    @_locked
    def record_instance(
        self,
        rec: InstanceRecord,
        *,
        calling_ae: str | None,
        peer_host: str | None,
        assoc_id: str | None,
        now: float | None = None,
    ) -> RecordResult:
        """Journal one stored instance; create or reopen its study."""
        now = time.time() if now is None else now
        key = self.study_key(rec.study_uid)
        conn = self._conn()
        with self._write(conn):
            exists = conn.execute(
                "SELECT 1 FROM instances WHERE sop_uid = ?", (rec.sop_uid,)
            ).fetchone()
            if exists:
                return RecordResult(key, new=False, reopened=False)
            row = conn.execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
            if row is not None and conn.execute(
                "SELECT 1 FROM produced WHERE sop_uid = ?", (rec.sop_uid,)
            ).fetchone():
                # One of our own outputs sent back to us (a PACS routing rule that forwards
                # everything the study receives): kept, but it is not news about the study,
                # so it must not reopen it, or each report would cause the next one.
                self._insert_instance(conn, rec, key, now, assoc_id)
                log.info("study %s: one of our own outputs came back (a routing rule?); "
                         "stored, study not reopened", key, extra={"study_key": key})
                return RecordResult(key, new=True, reopened=False)
            reopened = False
            if row is None:
                conn.execute(
                    "INSERT INTO studies(study_key, study_uid, state, run, calling_ae, peer_host, "
                    "created_at, run_started_at, updated_at) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?)",
                    (key, rec.study_uid, RECEIVING, calling_ae, peer_host, now, now, now),
                )
                self._transition(conn, key, None, RECEIVING, 1, "first instance", now)
                modalities: list[str] = []
            else:
                if row["state"] != RECEIVING:
                    self._reopen(conn, row, now)
                    reopened = True
                modalities = [m for m in row["modalities"].split(",") if m]
            if rec.modality and rec.modality not in modalities:
                modalities.append(rec.modality)
            self._insert_instance(conn, rec, key, now, assoc_id)
            conn.execute(
                "UPDATE studies SET instance_count = instance_count + 1, "
                "received_bytes = received_bytes + ?, modalities = ?, "
                "first_received_at = COALESCE(first_received_at, ?), last_received_at = ?, "
                "calling_ae = COALESCE(?, calling_ae), peer_host = COALESCE(?, peer_host), "
                "updated_at = ? WHERE study_key = ?",
                (rec.size, ",".join(modalities), now, now, calling_ae, peer_host, now, key),
            )
            if assoc_id is not None:
                conn.execute(
                    "INSERT OR IGNORE INTO assoc_studies(assoc_id, study_key) VALUES (?, ?)",
                    (assoc_id, key),
                )
        return RecordResult(key, new=True, reopened=reopened)

    @staticmethod
    def _insert_instance(conn: sqlite3.Connection, rec: InstanceRecord, key: str, now: float,
                         assoc_id: str | None) -> None:
        conn.execute(
            "INSERT INTO instances(sop_uid, study_key, series_uid, sop_class_uid, "
            "transfer_syntax, modality, path, size, digest, received_at, assoc_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.sop_uid, key, rec.series_uid, rec.sop_class_uid, rec.transfer_syntax,
                rec.modality, rec.path, rec.size, rec.digest, now, assoc_id,
            ),
        )

    @_locked
    def record_outputs(self, key: str, run: int, sop_uids: Iterable[str]) -> None:
        """Remember the SOP Instance UIDs we produced for a study, before they are sent: if a
        PACS sends them back they are stored without reopening the study."""
        conn = self._conn()
        with self._write(conn):
            conn.executemany(
                "INSERT OR IGNORE INTO produced(sop_uid, study_key, run) VALUES (?, ?, ?)",
                [(uid, key, run) for uid in sop_uids],
            )

    @_locked
    def forget(self, key: str) -> None:
        """Remove a study and everything recorded about it (retention, ``pacs-ai purge``);
        its files are deleted by the caller first."""
        conn = self._conn()
        with self._write(conn):
            for table in ("instances", "history", "deliveries", "produced", "assoc_studies", "studies"):
                conn.execute(f"DELETE FROM {table} WHERE study_key = ?", (key,))

    @_locked
    def record_delivery(self, key: str, run: int, destination: str, attempt: int, outcome: str,
                        seconds: float | None, answer: str | None) -> None:
        """One delivery attempt and its outcome (``stored``, ``retry``, ``failed``)."""
        conn = self._conn()
        with self._write(conn):
            conn.execute(
                "INSERT INTO deliveries(study_key, run, at, destination, attempt, outcome, seconds, answer) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, run, time.time(), destination, attempt, outcome, seconds, answer),
            )

    @_locked
    def deliveries(self, key: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        sql = "SELECT * FROM deliveries"
        params: list[Any] = []
        if key is not None:
            sql += " WHERE study_key = ?"
            params.append(key)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(limit)
        return [dict(r) for r in self._conn().execute(sql, params)]

    @_locked
    def instance(self, sop_uid: str) -> sqlite3.Row | None:
        return self._conn().execute(
            "SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,)
        ).fetchone()

    @_locked
    def count_duplicate(self, study_key: str, *, conflict: bool) -> None:
        conn = self._conn()
        with self._write(conn):
            conn.execute(
                "UPDATE studies SET duplicates = duplicates + 1, "
                "duplicate_conflicts = duplicate_conflicts + ? WHERE study_key = ?",
                (1 if conflict else 0, study_key),
            )

    @_locked
    def get(self, key: str) -> Study:
        row = self._conn().execute("SELECT * FROM studies WHERE study_key = ?", (key,)).fetchone()
        if row is None:
            raise UnknownStudy(f"no study {key}")
        return Study.from_row(row)

    @_locked
    def studies(self, states: Iterable[str] | None = None, limit: int | None = None) -> list[Study]:
        sql = "SELECT * FROM studies"
        params: list[Any] = []
        if states is not None:
            states = list(states)
            sql += f" WHERE state IN ({','.join('?' * len(states))})"
            params += states
        sql += " ORDER BY created_at DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [Study.from_row(r) for r in self._conn().execute(sql, params)]

    @_locked
    def history(self, key: str) -> list[sqlite3.Row]:
        return self._conn().execute(
            "SELECT * FROM history WHERE study_key = ? ORDER BY id", (key,)
        ).fetchall()

    @_locked
    def completed_at(self, key: str, run: int) -> float | None:
        """When run ``run`` of the study became COMPLETE (the first time)."""
        row = self._conn().execute(
            "SELECT MIN(at) FROM history WHERE study_key = ? AND run = ? AND to_state = ?",
            (key, run, COMPLETE),
        ).fetchone()
        return row[0] if row else None

    @_locked
    def series(self, key: str) -> list[dict[str, Any]]:
        """Series of a study with their instance counts, modality and one instance's spool path."""
        rows = self._conn().execute(
            "SELECT series_uid, MIN(modality) AS modality, COUNT(*) AS instances, MIN(path) AS sample "
            "FROM instances WHERE study_key = ? GROUP BY series_uid ORDER BY series_uid",
            (key,),
        )
        return [dict(r) for r in rows]

    # -- associations ------------------------------------------------------
    @_locked
    def open_association(
        self,
        assoc_id: str,
        *,
        calling_ae: str,
        called_ae: str,
        peer_host: str,
        peer_port: int,
    ) -> None:
        conn = self._conn()
        with self._write(conn):
            conn.execute(
                "INSERT INTO associations(assoc_id, pid, calling_ae, called_ae, peer_host, "
                "peer_port, opened_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (assoc_id, os.getpid(), calling_ae, called_ae, peer_host, peer_port, time.time()),
            )

    @_locked
    def record_rejected_association(self, *, calling_ae: str, called_ae: str, peer_host: str, peer_port: int,
                                    reason: str) -> None:
        """A refused association, as a closed row with outcome ``rejected: <reason>`` (the
        reason's standard words without the detail in parentheses): counted by the metrics."""
        now = time.time()
        conn = self._conn()
        with self._write(conn):
            conn.execute(
                "INSERT INTO associations(assoc_id, pid, calling_ae, called_ae, peer_host, peer_port, "
                "opened_at, closed_at, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (secrets.token_hex(16), os.getpid(), calling_ae, called_ae, peer_host, peer_port, now, now,
                 "rejected: " + reason.split(" (")[0]),
            )

    @_locked
    def close_association(self, assoc_id: str, outcome: str, *, instances: int = 0, failures: int = 0) -> None:
        """Close an association, with the instances it stored and refused."""
        conn = self._conn()
        with self._write(conn):
            conn.execute(
                "UPDATE associations SET closed_at = ?, outcome = ?, instances = ?, failures = ? "
                "WHERE assoc_id = ? AND closed_at IS NULL",
                (time.time(), outcome, instances, failures, assoc_id),
            )

    @_locked
    def close_stale_associations(self, outcome: str, pid: int | None = None) -> int:
        """Close associations left open by a dead process (all of them when
        ``pid`` is None, as at start)."""
        conn = self._conn()
        with self._write(conn):
            sql = "UPDATE associations SET closed_at = ?, outcome = ? WHERE closed_at IS NULL"
            params: list[Any] = [time.time(), outcome]
            if pid is not None:
                sql += " AND pid = ?"
                params.append(pid)
            return conn.execute(sql, params).rowcount

    @_locked
    def open_association_count(self) -> int:
        return self._conn().execute(
            "SELECT COUNT(*) FROM associations WHERE closed_at IS NULL"
        ).fetchone()[0]

    @_locked
    def receiving_studies(self) -> list[tuple[Study, int]]:
        """Every RECEIVING study with the number of open associations that
        sent instances of it (the completion tracker's poll)."""
        rows = self._conn().execute(
            "SELECT s.*, (SELECT COUNT(*) FROM assoc_studies x JOIN associations a "
            "ON a.assoc_id = x.assoc_id WHERE x.study_key = s.study_key "
            "AND a.closed_at IS NULL) AS open_assocs FROM studies s WHERE s.state = ?",
            (RECEIVING,),
        ).fetchall()
        out = []
        for r in rows:
            d = dict(r)
            n = d.pop("open_assocs")
            out.append((Study.from_row(d), n))  # type: ignore[arg-type]
        return out

    @_locked
    def known_paths(self) -> set[str]:
        return {r[0] for r in self._conn().execute("SELECT path FROM instances")}
