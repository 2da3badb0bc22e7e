"""Value checks of the night's settings: one wording for every section (``night.yaml`` and the settings classes)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_choice", "check_number"]


def check_number(key: str, value: object, *, integer: bool = False, least: float = -math.inf, above: bool = False,
            optional: bool = False) -> Any:  # fmt: skip
    """``value`` of setting ``key`` if it is a finite number (an integer) ≥ ``least`` (> with ``above``)."""
    if optional and value is None:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and not (isinstance(value, float) and not math.isfinite(value))  # nan, inf
    if not ok or value < least or (above and value == least):  # type: ignore[operator]
        bound = f" {'>' if above else '≥'} {least:g}" if least > -math.inf else ""
        raise ValueError(f"{key} must be {'an integer' if integer else 'a number'}{bound}"
                         f"{' or null' if optional else ''}, not {value!r}")  # fmt: skip
    return value


def check_choice(key: str, value: object, allowed: tuple, why: str = "") -> Any:
    if not any(type(value) is type(a) and value == a for a in allowed):  # not 1 for true, nor 1.0 for 1
        shown = ", ".join("true" if a is True else "false" if a is False else str(a) for a in allowed)
        raise ValueError(f"{key} must be one of {shown}{why}, not {value!r}")
    return value
