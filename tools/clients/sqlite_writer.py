"""The SQLite writer: commits numbered transactions until it is killed.

    python -m clients.sqlite_writer DB ACKLOG --mode wal|rollback

Each transaction inserts row `id` (a random payload and its CRC-32) and bumps the totals
row, with ``synchronous=FULL``, so a commit that returned is one SQLite promised to keep.
Only then is `id` appended to ACKLOG (outside the mount, fsync'd). Prints ``ready ID``
once the database is open, ID being the first id it will commit.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import zlib
from pathlib import Path

from clients.acklog import AckLog

JOURNAL_MODES = {"wal": "WAL", "rollback": "DELETE"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, crc INTEGER NOT NULL,
                                   payload BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS ledger_crc ON ledger (crc);
CREATE TABLE IF NOT EXISTS totals (one INTEGER PRIMARY KEY CHECK (one = 1),
                                   rows INTEGER NOT NULL, bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (1, 0, 0);
"""
MAX_PAYLOAD = 3000  # bytes; rows of varied size spill over pages and into overflow


def open_db(path: Path, mode: str) -> sqlite3.Connection:
    """Open (creating) the database in journal `mode`, durable on every commit."""
    db = sqlite3.connect(path, isolation_level=None)
    got = db.execute(f"PRAGMA journal_mode={JOURNAL_MODES[mode]}").fetchone()[0]
    if got.upper() != JOURNAL_MODES[mode]:
        raise SystemExit(f"sqlite_writer: journal_mode {JOURNAL_MODES[mode]} refused ({got})")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(SCHEMA)
    return db


def commit(db: sqlite3.Connection, txid: int, payload: bytes) -> None:
    """Commit transaction `txid`; returns only once SQLite reports the commit done."""
    db.execute("BEGIN IMMEDIATE")
    db.execute("INSERT INTO ledger VALUES (?, ?, ?)", (txid, zlib.crc32(payload), payload))
    db.execute("UPDATE totals SET rows = rows + 1, bytes = bytes + ?", (len(payload),))
    db.execute("COMMIT")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("db", type=Path)
    parser.add_argument("acklog", type=Path)
    parser.add_argument("--mode", choices=sorted(JOURNAL_MODES), required=True)
    args = parser.parse_args()
    db = open_db(args.db, args.mode)
    acks = AckLog(args.acklog)
    txid = db.execute("SELECT coalesce(max(id), 0) + 1 FROM ledger").fetchone()[0]
    print(f"ready {txid}", flush=True)
    while True:
        commit(db, txid, os.urandom(random.randint(1, MAX_PAYLOAD)))
        acks.ack(txid)
        txid += 1


if __name__ == "__main__":
    main()
