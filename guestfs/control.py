"""The control socket between the `guestfs` command line and a running daemon.

One Unix stream socket per machine, ``<machine dir>/<machine>.sock``, mode 0600.
Protocol: the client sends one JSON object on one line, ``{"op": NAME, ...}``, and
reads one JSON line back: ``{"ok": true, ...}`` or ``{"ok": false, "error": MESSAGE}``.
The daemon answers "status", "check" (an fsck of the live filesystem), "extents" (of
one file), "umount", "kexec", "kexec-load" and "kexec-unload"; an unknown op is
answered with an error. The server runs inside the daemon's trio
loop, so it answers while the filesystem serves; the client is plain blocking Python.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:   # the server imports trio when it starts: the command line never does
    import trio

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
REPLY_GRACE = 1.0  # seconds a reply may still take when the daemon is shutting down

Message = dict[str, Any]
OpHandler = Callable[[Message], Awaitable[Message]]


class ControlError(Exception):
    """The daemon could not be reached, or it answered with an error."""


class DaemonRefused(ControlError):
    """The daemon answered, with an error: the request was refused or failed."""


class NoDaemon(ControlError):
    """Nothing listens on the control socket: no daemon runs for that machine."""


def socket_path(machine_dir: Path, machine: str) -> Path:
    """Where the daemon of `machine` listens."""
    return machine_dir / f"{machine}.sock"


# --- server (inside the daemon) ---------------------------------------------------


class ControlServer:
    """Serves requests on the control socket by dispatching ``op`` to a handler.

    `ops` maps an op name to an async handler that gets the request and returns the
    reply's fields; a handler raising `ControlError` answers ``{"ok": false}`` with its
    message. Adding an op (e.g. ``kexec``) is adding an entry to `ops`.
    """

    def __init__(self, path: Path, ops: Mapping[str, OpHandler]) -> None:
        self.path = path
        self.ops = dict(ops)

    async def serve(self, *, task_status: trio.TaskStatus[None] | None = None) -> None:
        """Listen until cancelled; `task_status.started()` once connections are accepted."""
        import trio
        task_status = task_status or trio.TASK_STATUS_IGNORED
        listener = await self._listen()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                while True:
                    conn, _ = await listener.accept()
                    nursery.start_soon(self._serve_connection, trio.SocketStream(conn))
        finally:
            listener.close()
            self.path.unlink(missing_ok=True)

    async def _listen(self) -> trio.socket.SocketType:
        # The machine lock (taken at boot) guarantees we are the only daemon of this
        # machine, so a socket file left here belongs to a dead daemon.
        import trio
        self.path.unlink(missing_ok=True)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(os.fspath(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(16)
        return sock

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        import trio
        async with stream:
            try:
                request = await _read_message(stream)
            except (ControlError, trio.BrokenResourceError) as e:
                log.warning("control: bad request: %s", e)
                return
            reply = await self._dispatch(request)
            # Shielded so that a reply to "umount" still reaches the client while the
            # daemon is cancelling everything on its way out.
            with trio.CancelScope(shield=True), trio.move_on_after(REPLY_GRACE):
                try:
                    await stream.send_all(_encode(reply))
                except trio.BrokenResourceError:
                    log.info("control: client left before the reply to %s", request.get("op"))

    async def _dispatch(self, request: Message) -> Message:
        op = request.get("op")
        handler = self.ops.get(op) if isinstance(op, str) else None
        if handler is None:
            return {"ok": False, "error": f"unknown control op {op!r}; known: {', '.join(sorted(self.ops))}"}
        try:
            return {"ok": True, **await handler(request)}
        except ControlError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:
            log.exception("control op %s failed", op)
            return {"ok": False, "error": f"{op} failed in the daemon: {e!r}"}


async def _read_message(stream: trio.SocketStream) -> Message:
    data = b""
    while not data.endswith(b"\n"):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            raise ControlError("request too large")
    return _decode(data)


# --- client (the command line) ----------------------------------------------------


def request(path: Path, message: Message, *, timeout: float | None = 10.0) -> Message:
    """Send one request to the daemon listening at `path` and return its reply.

    Raises `ControlError` when nobody listens, the connection breaks, the reply is not
    JSON, or the daemon answers with an error.
    """
    reply = _exchange(path, message, timeout)
    if not reply.get("ok"):
        raise DaemonRefused(reply.get("error") or "the daemon answered with an unspecified error")
    return reply


def _exchange(path: Path, message: Message, timeout: float | None) -> Message:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.sendall(_encode(message))
            data = b""
            while not data.endswith(b"\n") and len(data) <= MAX_MESSAGE:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NoDaemon(f"no daemon listens on {path}") from e
    except TimeoutError as e:
        raise ControlError(f"the daemon on {path} did not answer within {timeout} s") from e
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from e
    if not data:
        raise ControlError(f"the daemon on {path} closed the connection without a reply")
    return _decode(data)


def _encode(message: Message) -> bytes:
    # default=str: paths and enums in replies become their text rather than an error
    return json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"


def _decode(data: bytes) -> Message:
    try:
        message = json.loads(data)
    except ValueError as e:
        raise ControlError(f"malformed control message: {e}") from e
    if not isinstance(message, dict):
        raise ControlError("malformed control message: not a JSON object")
    return message
