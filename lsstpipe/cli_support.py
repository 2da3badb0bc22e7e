"""What the stand-alone entry points of the command modules share (``python -m lsstpipe.detect_cli`` …)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def standalone_main(name: str, add_parser: Callable, run: Callable, argv=None) -> int:
    """Parse ``argv`` for one ``lsstpipe NAME`` sub-command and run it with lsstpipe's error handling:
    a bad input (ValueError, FileNotFoundError) prints ``lsstpipe NAME: error: …`` and returns 2."""
    parser = argparse.ArgumentParser(prog="lsstpipe")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"lsstpipe {name}: error: {exc}", file=sys.stderr)
        return 2
