"""What the ``lsstpipe`` entry points share: reporting a bad input or a file system error as one clear line.

Only errors that describe the user's input or environment are reported this way: ``ValueError`` (a bad
value, raised with a message that says what to do) and ``OSError`` (a file that cannot be read or written,
reported with its name, the operating system's reason and what to do). Anything else is a bug in lsstpipe
and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable

#: What to do about an operating-system error, by ``errno``.
_OS_ADVICE = {
    errno.ENOENT: "check the path (and that its directory exists)",
    errno.EISDIR: "it is a directory: give the path of a file",
    errno.ENOTDIR: "a part of the path is a file, not a directory: choose another path",
    errno.EEXIST: "something is already in the way there: remove it or choose another path",
    errno.EACCES: "check the permissions, or choose a path you may use",
    errno.EPERM: "check the permissions, or choose a path you may use",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is exhausted: free some space or write elsewhere",
    errno.ENAMETOOLONG: "choose a shorter path",
}

#: The error types reported as ``lsstpipe NAME: error: …`` (exit status 2); anything else is a bug.
USER_ERRORS = (ValueError, OSError)


def describe_error(exc: BaseException) -> str:
    """One line for a user error: the message of a ``ValueError`` (or of an ``OSError`` raised by lsstpipe
    with its own message); for an operating-system error, the file, the system's reason and what to do.

    Parameters
    ----------
    exc : BaseException
        A ``ValueError`` or ``OSError``.

    Returns
    -------
    str
        The message, without the ``lsstpipe NAME: error:`` prefix.
    """
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = str(exc.filename)
        if exc.filename2 is not None:
            where += f" -> {exc.filename2}"
        advice = _OS_ADVICE.get(exc.errno or 0, "check the path and try again")
        return f"{where}: {exc.strerror}; {advice}"
    return str(exc)


def report_error(name: str, exc: BaseException) -> int:
    """Print ``lsstpipe NAME: error: …`` for a user error on stderr; returns the exit status, 2."""
    print(f"lsstpipe {name}: error: {describe_error(exc)}", file=sys.stderr)
    return 2


def standalone_main(name: str, add_parser: Callable, run: Callable, argv=None) -> int:
    """Parse ``argv`` for one ``lsstpipe NAME`` sub-command and run it with lsstpipe's error handling:
    a bad input (ValueError) or a file that cannot be read or written (OSError) prints
    ``lsstpipe NAME: error: …`` and returns 2."""
    parser = argparse.ArgumentParser(prog="lsstpipe")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as exc:
        return report_error(name, exc)
