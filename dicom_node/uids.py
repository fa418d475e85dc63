"""UID validation and study keys.

A UID received from the network becomes part of a path in the spool, so it is
checked against PS3.5 Section 9.1 before it is used: digits and dots only,
no empty component, at most 64 characters. ``../../x`` or ``1.2/3`` can
therefore never name anything outside the spool.
"""

import hashlib
import hmac
import re
import uuid

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
MAX_UID_LENGTH = 64  # PS3.5 Section 9.1


class InvalidUID(ValueError):
    """A value that is not a UID as PS3.5 Section 9.1 defines it."""


def validate_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` as a clean UID string, or raise :class:`InvalidUID`.

    Trailing NUL/space padding (PS3.5 Section 9.1 pads UIDs to even length
    with NUL) is stripped first. Leading zeros inside a component are
    tolerated: they are wrong by the standard but common in the field, and
    harmless in a path.
    """
    if value is None:
        raise InvalidUID(f"{what} is missing")
    text = str(value).rstrip("\x00 ")
    if not text:
        raise InvalidUID(f"{what} is empty")
    if len(text) > MAX_UID_LENGTH:
        raise InvalidUID(f"{what} is longer than {MAX_UID_LENGTH} characters")
    if not _UID_RE.match(text):
        raise InvalidUID(f"{what} has characters other than digits and dots")
    return text


def study_key(study_uid: str, salt: bytes) -> str:
    """The key that names a study in logs, metrics and the CLI.

    A salted hash of the Study Instance UID (16 hex digits): stable for one
    journal, meaningless outside it, so logs can be shared without study UIDs.
    """
    digest = hmac.new(salt, study_uid.encode("ascii"), hashlib.sha256).hexdigest()
    return digest[:16]


_OUTPUT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/pacs-ai/pacs-ai/outputs")


def derived_uid(*parts: object) -> str:
    """A UID that is a pure function of ``parts``: ``2.25.<UUID as integer>`` (PS3.5
    Section B.2) with a name-based UUID (RFC 9562 version 5) of the parts joined by NUL.

    Outputs are named this way from (study UID, the input SOP Instance UIDs, model name
    and version, what the object is), so rebuilding a result gives the same UIDs and a
    PACS that receives it twice sees the same instances, not duplicates. Joining with a
    separator keeps ("ab", "c") and ("a", "bc") apart.
    """
    name = "\x00".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(_OUTPUT_NAMESPACE, name).int}"
