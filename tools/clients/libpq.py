"""The few libpq calls the PostgreSQL experiment needs, through ctypes.

The system's libpq5 (installed with PostgreSQL) is used directly, so the experiment needs
no Python driver in the virtual environment.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from types import TracebackType

CONNECTION_OK = 0
PGRES_COMMAND_OK = 1
PGRES_TUPLES_OK = 2

_lib = ctypes.CDLL(ctypes.util.find_library("pq") or "libpq.so.5")
_lib.PQconnectdb.restype = ctypes.c_void_p
_lib.PQconnectdb.argtypes = [ctypes.c_char_p]
_lib.PQstatus.argtypes = [ctypes.c_void_p]
_lib.PQerrorMessage.restype = ctypes.c_char_p
_lib.PQerrorMessage.argtypes = [ctypes.c_void_p]
_lib.PQfinish.argtypes = [ctypes.c_void_p]
_lib.PQexec.restype = ctypes.c_void_p
_lib.PQexec.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_lib.PQresultStatus.argtypes = [ctypes.c_void_p]
_lib.PQresultErrorMessage.restype = ctypes.c_char_p
_lib.PQresultErrorMessage.argtypes = [ctypes.c_void_p]
_lib.PQntuples.argtypes = [ctypes.c_void_p]
_lib.PQnfields.argtypes = [ctypes.c_void_p]
_lib.PQgetisnull.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_lib.PQgetvalue.restype = ctypes.c_char_p
_lib.PQgetvalue.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
_lib.PQclear.argtypes = [ctypes.c_void_p]


class PgError(Exception):
    """Connecting or a statement failed; the message is libpq's."""


Rows = list[tuple[str | None, ...]]


class Connection:
    """One blocking connection; every statement runs in autocommit, so a statement
    that returned without error is committed."""

    def __init__(self, conninfo: str) -> None:
        self._conn = _lib.PQconnectdb(conninfo.encode())
        if _lib.PQstatus(self._conn) != CONNECTION_OK:
            message = _lib.PQerrorMessage(self._conn).decode(errors="replace").strip()
            _lib.PQfinish(self._conn)
            raise PgError(message)

    def execute(self, sql: str) -> Rows:
        """Run `sql`; its rows (text values), empty for a command."""
        res = _lib.PQexec(self._conn, sql.encode())
        try:
            status = _lib.PQresultStatus(res)
            if status not in (PGRES_COMMAND_OK, PGRES_TUPLES_OK):
                error = (_lib.PQresultErrorMessage(res) if res else
                         _lib.PQerrorMessage(self._conn))
                raise PgError(error.decode(errors="replace").strip())
            return [tuple(None if _lib.PQgetisnull(res, r, c) else
                          _lib.PQgetvalue(res, r, c).decode()
                          for c in range(_lib.PQnfields(res)))
                    for r in range(_lib.PQntuples(res))]
        finally:
            _lib.PQclear(res)

    def close(self) -> None:
        if self._conn:
            _lib.PQfinish(self._conn)
            self._conn = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
