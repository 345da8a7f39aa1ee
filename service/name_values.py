"""NAME=VALUE on a command line: the one parser for the service's and the trainer's flags.

Two shapes: a repeated flag with one pair each (`--dataset en=/data/en --dataset de=s3://b/de`), where the
value is everything after the first "=" (a path may hold "," or "="); and a comma-separated list in one
flag (`--weights en=0.05,de=0.95`), where blanks around items are dropped and an empty item (a trailing
comma) is ignored. Either way a name given twice is refused. Errors are `argparse.ArgumentTypeError`s
whose message names the flag and the item, for `parser.error`.
"""

from __future__ import annotations

import argparse
from typing import Iterable


def name_value(text: str, flag: str, what: str = "VALUE") -> tuple[str, str]:
    """One NAME=VALUE, split at the first "="; `what` names the value in the message (e.g. PATH)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected NAME={what}")
    return name.strip(), value.strip()


def name_values(items: Iterable[str], flag: str, what: str = "VALUE") -> dict[str, str]:
    """The pairs of a repeated flag, one NAME=VALUE each, in the order given."""
    pairs: dict[str, str] = {}
    for item in items:
        name, value = name_value(item, flag, what)
        if name in pairs:
            raise argparse.ArgumentTypeError(f"{flag} {name}: given twice")
        pairs[name] = value
    return pairs


def number_list(text: str, flag: str) -> dict[str, float]:
    """A comma-separated NAME=NUMBER list, e.g. --weights en=0.05,de=0.95."""
    items = [item for item in (part.strip() for part in text.split(",")) if item]
    if not items:
        raise argparse.ArgumentTypeError(f"{flag} {text!r}: expected NAME=NUMBER,...")
    numbers = {}
    for name, value in name_values(items, flag, "NUMBER").items():
        try:
            numbers[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {name}={value}: {value!r} is not a number") from None
    return numbers
