"""The kinds of failure the CLI distinguishes (SPEC §1: exit 2 for bad input, exit 1 for failed work, 130 for
Ctrl-C), and how Ctrl-C is told apart from a failure."""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class GptqError(Exception):
    """The work failed (exit code 1). The message is one line saying what went wrong."""

    exit_code = 1


class UsageError(GptqError):
    """Bad usage or bad input (exit code 2). The message says what is wrong and what to do."""

    exit_code = 2


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (exit code 130, as for any SIGINT), with a message saying what was kept and how to continue
    (quantize: the finished blocks of `total`, in the work dir). A KeyboardInterrupt still, so that code
    catching Exception does not swallow it."""

    exit_code = 130

    def __init__(self, message: str, *, finished: int = 0, total: int = 0):
        super().__init__(message)
        self.finished, self.total = finished, total


@contextmanager
def noting_interrupts() -> Iterator[Callable[[], bool]]:
    """Yields a function that says whether SIGINT arrived within. Ctrl-C still raises KeyboardInterrupt at once,
    but when it lands inside a C extension the extension may turn it into its own error (safetensors'
    get_tensor raises ValueError); the note lets the caller treat that error as the interrupt it is.
    Notes nothing outside the main thread or when SIGINT is not handled by Python (ignored, default)."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield lambda: False
        return
    seen: list[int] = []

    def note_then_raise(signum, frame):
        seen.append(signum)
        previous(signum, frame)

    signal.signal(signal.SIGINT, note_then_raise)
    try:
        yield lambda: bool(seen)
    finally:
        signal.signal(signal.SIGINT, previous)
