"""What the node accepts as a DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1).

Leading zeros in a component are tolerated (older scanners write them); anything else, such as
letters, spaces, slashes, empty components or ``..``, is not a UID.
"""

from __future__ import annotations

import re

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_valid_uid(value: str) -> bool:
    """True when ``value`` is a UID by PS3.5: 1-64 characters, numeric components joined by dots."""
    return 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def uid_problem(value: str) -> str | None:
    """Why ``value`` is not a valid UID (for a refusal message), or None when it is one."""
    if not value:
        return "empty"
    if len(value) > MAX_UID_LENGTH:
        return f"{len(value)} characters (at most {MAX_UID_LENGTH})"
    if _UID.fullmatch(value) is None:
        return f"{value[:MAX_UID_LENGTH]!r} is not digits and dots"
    return None
