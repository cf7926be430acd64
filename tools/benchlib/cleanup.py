"""Cleaning up on every way out: errors, Ctrl-C, SIGTERM and SIGHUP.

Each part of the benchmark keeps an `undo_stack` of undo actions (unmount this mount
point, end this PID, destroy this machine, remove this folder), pushed as each thing is
made. `signals_interrupt` turns SIGTERM and SIGHUP into `KeyboardInterrupt`, as SIGINT
already is, so that the stacks unwind; while a stack unwinds the three signals are
ignored, so a second Ctrl-C cannot leave a mount or a machine behind.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from types import FrameType
from typing import Any

from benchlib.log import say

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def quietly(action: Callable[..., Any], *args: Any) -> Callable[[], None]:
    """An undo action that reports its failure instead of raising, so the actions
    pushed before it still run."""

    def undo() -> None:
        try:
            action(*args)
        except Exception as e:  # cleanup goes on whatever one step says
            say(f"cleanup: {getattr(action, '__name__', action)}: {e}")

    return undo


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextmanager
def _handlers(handler: Any) -> Iterator[None]:
    previous = {sig: signal.signal(sig, handler) for sig in _SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def signals_interrupt() -> Any:
    """Inside: SIGINT, SIGTERM and SIGHUP raise `KeyboardInterrupt`."""
    return _handlers(_interrupt)


@contextmanager
def undo_stack() -> Iterator[ExitStack]:
    """An `ExitStack` of undo actions, unwound with the three signals ignored."""
    stack = ExitStack()
    try:
        yield stack
    finally:
        with _handlers(signal.SIG_IGN):
            stack.close()
