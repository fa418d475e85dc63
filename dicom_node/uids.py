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


def output_uids(
    study_uid: str,
    source_sop_instance_uids,
    model_name: str,
    model_version: str,
) -> dict:
    """Every UID of a result, derived from what produced it (DESIGN.md section 4).

    The input is a *set*: order and repetition of ``source_sop_instance_uids`` do not
    matter, any instance more or less does. Keys: ``sr_series``, ``sr_instance``,
    ``sc_series``, ``seg_series``, ``seg_instance``, ``kos_series``, ``kos_instance``
    (strings), ``sc_instance`` (a function of the key image's number) and ``tracking`` (a
    function of a group's key: the finding's number, or "study" and "triage" for the
    study-level groups).
    """
    inputs = "\n".join(sorted({str(u) for u in source_sop_instance_uids}))
    digest = hashlib.sha256(inputs.encode("ascii")).hexdigest()
    base = (str(study_uid), digest, str(model_name), str(model_version))

    def uid(*what: object) -> str:
        return derived_uid(*base, *what)

    return {
        "sr_series": uid("sr", "series"),
        "sr_instance": uid("sr", "instance"),
        "sc_series": uid("sc", "series"),
        "sc_instance": lambda n: uid("sc", "instance", int(n)),
        "seg_series": uid("seg", "series"),
        "seg_instance": uid("seg", "instance"),
        "kos_series": uid("kos", "series"),
        "kos_instance": uid("kos", "instance"),
        "kos_device": uid("kos", "device"),
        "seg_dimension_organization": uid("seg", "dimension-organization"),
        "tracking": lambda key: uid("tracking", key),
    }
