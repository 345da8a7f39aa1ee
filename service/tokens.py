"""Bearer tokens read from files (`--admin-token-file`, `--read-token-file`, `--stream-token-file`)."""

from __future__ import annotations

from pathlib import Path

from service.errors import ServiceError

MIN_TOKEN_LENGTH = 16


class TokenFileError(ServiceError, ValueError):
    """A token file is unreadable or holds too short a token; the message names the flag and file."""


def read_token(path: Path | None, flag: str) -> str | None:
    """The token in `path` (surrounding whitespace dropped), or None when no file was given."""
    if path is None:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as e:
        raise TokenFileError(f"{flag} {path}: cannot read it ({e.strerror})") from e
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenFileError(f"{flag} {path}: the token must be at least {MIN_TOKEN_LENGTH} characters")
    return token
