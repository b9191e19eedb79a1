"""The kinds of failure the CLI distinguishes (SPEC §1: exit 2 for bad input, exit 1 for failed
work, 130 for Ctrl-C), and how Ctrl-C is told apart from a failure."""

from __future__ import annotations

import errno
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


class GptqError(Exception):
    """The work failed (exit code 1). The message is one line saying what went wrong."""

    exit_code = 1


class UsageError(GptqError):
    """Bad usage or bad input (exit code 2). The message says what is wrong and what to do."""

    exit_code = 2


# What an OSError from the file system means for the user, and what to do about it.
_OS_ERRORS = {
    errno.ENOSPC: ("no space left on the device", "free space there or write elsewhere"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or write elsewhere"),
    errno.EROFS: ("read-only file system", "choose a directory you can write to"),
    errno.EACCES: ("permission denied", "choose a directory you can write to"),
    errno.ENAMETOOLONG: ("a name too long for the file system", "choose a shorter name"),
    errno.EIO: ("an I/O error", "check the disk"),
}


def describe_os_error(e: OSError) -> str:
    """One line for a file-system error: what happened, where (for a copy, its destination), what
    to do."""
    what, advice = _OS_ERRORS.get(e.errno, (e.strerror or type(e).__name__, "check that path"))
    where = e.filename2 or e.filename
    return (
        f"{what}{f' at {where}' if where else ''} ({errno.errorcode.get(e.errno, e.errno)}): "
        f"{advice}"
    )


def naming_the_file(e: BaseException, path: str | Path) -> BaseException:
    """`e`, or for an OSError that names no file (a failed write), the same error naming `path`."""
    if isinstance(e, OSError) and e.errno and not e.filename:
        return OSError(e.errno, e.strerror, str(path))
    return e


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (exit code 130, as for any SIGINT), with a message saying what was kept and how to
    continue (quantize: the finished blocks of `total`, in the work dir). A KeyboardInterrupt
    still, so that code catching Exception does not swallow it."""

    exit_code = 130

    def __init__(self, message: str, *, finished: int = 0, total: int = 0):
        super().__init__(message)
        self.finished, self.total = finished, total


@contextmanager
def noting_interrupts() -> Iterator[Callable[[], bool]]:
    """Yields a function that says whether SIGINT arrived within. Ctrl-C still raises
    KeyboardInterrupt at once, but when it lands inside a C extension the extension may turn it
    into its own error (safetensors' get_tensor raises ValueError); the note lets the caller
    treat that error as the interrupt it is. Notes nothing outside the main thread or when SIGINT
    is not handled by Python (ignored, default)."""
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
