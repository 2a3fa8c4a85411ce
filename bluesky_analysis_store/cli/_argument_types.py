"""The types of option values: text from the command line to a checked value, or a usage
error that names what was expected."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; the value is read as JSON when it is JSON (``3``, ``true``, ``[1, 2]``),
    else kept as the string given."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def key_format(text: str) -> tuple[str, str]:
    """``KEY=FORMAT``, e.g. ``normalised=TIFF``."""
    key, separator, fmt = text.partition("=")
    if not separator or not key.strip() or not fmt.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=FORMAT (e.g. normalised=TIFF), got {text!r}"
        )
    return key.strip(), fmt.strip()


def _whole_number_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected a number of at least {minimum}, got {value}"
            )
        return value

    parse.__doc__ = f"A whole number of at least {minimum}."
    return parse


positive_int = _whole_number_at_least(1)
non_negative_int = _whole_number_at_least(0)


def figure_size(text: str) -> tuple[float, float]:
    """``WIDTHxHEIGHT`` in inches, both above 0, e.g. ``6.4x4.8``."""
    width, separator, height = text.lower().partition("x")
    try:
        size = (float(width), float(height))
    except ValueError:
        size = (0.0, 0.0)
    if not separator or min(size) <= 0:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT in inches, e.g. 6.4x4.8, got {text!r}"
        )
    return size
