"""Checking one setting: the message names the key, the value and what is valid."""

from __future__ import annotations

from typing import Any


def check_number(key: str, value: Any, low: float, *, integer: bool = True, none: bool = False,
            strict: bool = False, high: float | None = None) -> None:  # fmt: skip
    """``value`` is a number (an int when ``integer``) >= ``low`` (> with ``strict``), <= ``high``."""
    if value is None and none:
        return
    kind = int if integer else (int, float)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        what = "an integer" if integer else "a number"
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"{key}={value!r} must be {what} {rng}" + (" (or null)" if none else ""))
