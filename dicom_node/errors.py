"""The errors the ``dicom_node`` package raises on purpose.

Two kinds of trouble with a peer need different reactions (DESIGN.md
section 9), so they are two classes:

- :class:`PacsUnavailable`: the peer could not be reached or stopped
  answering. It may well work in a minute: delivery retries it with backoff.
- :class:`PacsRejected`: the peer answered and said no. Asking again gives
  the same answer until someone changes a configuration: never retried.

Callers translate lower-level exceptions into these with ``raise ... from``,
and the composition root turns them into one line for a person. Messages
name the peer, never a patient.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base of every error ``dicom_node`` raises on purpose."""


class PacsUnavailable(DicomNodeError):
    """The peer could not be reached or stopped answering.

    Connection refused or timed out, host not resolvable, association aborted
    (A-ABORT, or the connection closed, PS3.8 Section 7.3), or a DIMSE
    response that never came (PS3.7 Section 9.1.1). Worth retrying later.
    """


class PacsRejected(DicomNodeError):
    """The peer refused the association or everything proposed in it.

    Either an A-ASSOCIATE-RJ (PS3.8 Section 9.3.4: ``result``, ``source`` and
    ``reason`` hold its fields and the message gives them in the standard's
    words) or an association on which the peer accepted none of the proposed
    presentation contexts (PS3.8 Section 9.3.3.2), or a service answered with
    a refusal. Retrying does not help: not retried.
    """

    def __init__(
        self,
        message: str,
        *,
        result: int | None = None,
        source: int | None = None,
        reason: int | None = None,
    ) -> None:
        super().__init__(message)
        self.result = result
        self.source = source
        self.reason = reason


# PS3.8 Section 9.3.4, Table 9-21 (A-ASSOCIATE-RJ PDU fields), in the
# standard's own words so that a log line can be matched against the peer's.
_REJECT_RESULTS = {1: "rejected-permanent", 2: "rejected-transient"}
_REJECT_SOURCES = {
    1: "service-user",
    2: "service-provider (ACSE related function)",
    3: "service-provider (presentation related function)",
}
_REJECT_REASONS = {
    1: {
        1: "no-reason-given",
        2: "application-context-name-not-supported",
        3: "calling-AE-title-not-recognized",
        7: "called-AE-title-not-recognized",
    },
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}


def describe_reject(result: int | None, source: int | None, reason: int | None) -> str:
    """The A-ASSOCIATE-RJ fields in words, e.g. ``"rejected-permanent,
    service-user, calling-AE-title-not-recognized"`` (PS3.8 Table 9-21).

    Values the table does not define are shown as numbers, so that nothing
    the peer said is lost.
    """
    words = [
        _REJECT_RESULTS.get(result, f"result {result}") if result is not None else "result ?",
        _REJECT_SOURCES.get(source, f"source {source}") if source is not None else "source ?",
    ]
    if reason is None:
        words.append("reason ?")
    else:
        words.append(_REJECT_REASONS.get(source or 0, {}).get(reason, f"reason {reason}"))
    return ", ".join(words)
