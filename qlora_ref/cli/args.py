"""Argument types of the ``qlora-ref`` command line: ranges and output paths checked at parse time.

A bad argument is refused before any work starts, as one line on stderr and exit status 2 (see
``qlora_ref.cli``). Pairs with ``qlora_ref.formats.safe_io`` (``check_writable``).
"""

from __future__ import annotations

import argparse

from qlora_ref.formats.safe_io import check_writable

__all__ = ["ArgumentParser", "one_line", "int_in", "writable_file"]


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def one_line(exc: BaseException) -> str:
    r"""The message of a user error on one line (newlines and runs of spaces collapsed).

    Examples
    --------
    >>> one_line(ValueError("a\n  b"))
    'a b'
    """
    return " ".join(str(exc).split()) or type(exc).__name__


def int_in(low: int, high: int | None = None):
    """Return an argparse type: an int in ``[low, high]`` (``high`` None: no upper bound).

    Examples
    --------
    >>> int_in(1, 8)("3")
    3
    >>> int_in(1, 8)("0")
    Traceback (most recent call last):
    ...
    argparse.ArgumentTypeError: 0 is out of range: expected an int from 1 to 8
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
        if value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} is out of range: expected an int {bound}")
        return value
    parse.__name__ = "int"
    return parse


def writable_file(text: str) -> str:
    """Argparse type of an output file: checked writable before a long run (``check_writable``)."""
    if text == "":
        return text  # "" means: no output file
    try:
        check_writable(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
