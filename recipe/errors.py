"""The recipe's one base error: what was wrong, where (file, line, key) and what to do, said as `error: ...`."""

from __future__ import annotations


class RecipeError(Exception):
    """A user's mistake in a recipe or its inputs, or a step that failed: one line, exit status 2."""
