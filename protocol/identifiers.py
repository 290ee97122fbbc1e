"""The one definition of a protocol identifier: agent ids, model versions, fleet names, profile names.

An identifier is 1-64 of ``[A-Za-z0-9_.-]`` and neither ``.`` nor ``..``: never an MQTT wildcard or
separator (so a broker ACL can pin an agent to ``agents/%c/…``) and never a path that climbs out of
the folder it names (versions and agent ids become folder names on the box and the coordinator).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from protocol.errors import Reason, UnknownTopic

__all__ = ["ID_PATTERN", "Identifier", "is_identifier", "validate_id"]

#: The character class and length, as a pattern anchored at both ends (for JSON schema and pydantic).
ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
_ID = re.compile(ID_PATTERN)  # used with fullmatch: a trailing newline is not matched by "$" then
_DOTS = frozenset({".", ".."})


def is_identifier(value: object) -> bool:
    """Tell whether ``value`` is a legal identifier (a ``str``, whole-string match, not a dot name)."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None and value not in _DOTS


def _not_dots(value: str) -> str:
    if value in _DOTS:
        raise ValueError(f"{value!r} is not an identifier (a path, not a name)")
    return value


#: A pydantic field type for identifiers in messages, manifests and profiles.
Identifier = Annotated[str, Field(pattern=ID_PATTERN), AfterValidator(_not_dots)]


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a legal identifier, else raise ``UnknownTopic`` (``illegal_id``)."""
    if not is_identifier(value):
        raise UnknownTopic(f"illegal {what} {value!r}: use 1-64 of [A-Za-z0-9_.-], not '.' or '..'",
                           reason=Reason.ILLEGAL_ID)
    return value
