"""The one check for integer fields (steps, ranks, sizes): an int in a range, never a bool or a float."""

from __future__ import annotations

from typing import Optional

import numpy as np


def is_integer(value: object, minimum: int = 0, maximum: Optional[int] = None) -> bool:
    """Whether `value` is an integer (Python or numpy, not bool) with minimum <= value <= maximum."""
    return (not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= minimum
            and (maximum is None or value <= maximum))


def check_integer(value: object, field: str, minimum: int = 0, maximum: Optional[int] = None,
                  error: type[Exception] = ValueError, hint: str = "") -> int:
    """`value` as an int, or `error` naming the field, what it got and the range it must be in."""
    if not is_integer(value, minimum, maximum):
        bounds = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise error(f"{field}: {value!r}; it must be an integer {bounds}{hint}")
    return int(value)
