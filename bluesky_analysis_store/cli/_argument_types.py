"""The types of option values: text from the command line to a checked value, or a usage
error that names what was expected."""

from __future__ import annotations

import argparse
import json
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


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number of at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """A whole number of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, got {value}")
    return value


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
