"""The PostgreSQL writer: commits numbered rows until the server goes away.

    python -m clients.pg_writer CONNINFO ACKLOG

Each id is one autocommit INSERT into ``ledger``; only after it returned (with the
default ``synchronous_commit=on``: flushed to the WAL) is the id appended to ACKLOG,
outside the mount, fsync'd. Prints ``ready ID`` first, then commits until a statement
fails (the server was killed) and exits 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clients.acklog import AckLog
from clients.libpq import Connection, PgError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("conninfo")
    parser.add_argument("acklog", type=Path)
    args = parser.parse_args()
    acks = AckLog(args.acklog)
    with Connection(args.conninfo) as conn:
        txid = int(conn.execute("SELECT coalesce(max(id), 0) + 1 FROM ledger")[0][0] or 1)
        print(f"ready {txid}", flush=True)
        try:
            while True:
                conn.execute(f"INSERT INTO ledger VALUES ({txid}, md5('{txid}'))")
                acks.ack(txid)
                txid += 1
        except PgError as e:
            reason = " ".join(str(e).split())  # libpq's message spans lines
            print(f"pg_writer: stopped at id {txid}: {reason}", file=sys.stderr)


if __name__ == "__main__":
    main()
