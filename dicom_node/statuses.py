"""DIMSE status codes and A-ASSOCIATE-RJ reasons used by the node.

Every status the node answers with is a named constant here, with the part of
the standard that defines it, so that a log line or a test can name a status
instead of a magic number.
"""

# PS3.7 Annex C.1: success.
SUCCESS = 0x0000

# PS3.4 Table B.2-1 (Storage Service Class C-STORE statuses).
#: Refused: Out of Resources (disk full, write error). The instance was not stored.
OUT_OF_RESOURCES = 0xA700
#: Error: Data Set does not match SOP Class.
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: Cannot understand (0xC000-0xCFFF); the node uses these sub-codes:
CANNOT_UNDERSTAND_UNDECODABLE = 0xC210  # the dataset could not be parsed
CANNOT_UNDERSTAND_PROCESSING = 0xC211  # unexpected failure while storing (pynetdicom uses it too)
CANNOT_UNDERSTAND_INVALID_UID = 0xC212  # a UID that is not a valid PS3.5 9.1 UID
CANNOT_UNDERSTAND_UID_MISMATCH = 0xC213  # command and dataset disagree on the instance
CANNOT_UNDERSTAND_TOO_LARGE = 0xC214  # instance larger than node.max_instance_bytes

STORE_STATUS_NAMES = {
    SUCCESS: "Success",
    OUT_OF_RESOURCES: "Refused: Out of Resources",
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS: "Error: Data Set does not match SOP Class",
    CANNOT_UNDERSTAND_UNDECODABLE: "Error: Cannot understand (undecodable data set)",
    CANNOT_UNDERSTAND_PROCESSING: "Error: Cannot understand (processing failure)",
    CANNOT_UNDERSTAND_INVALID_UID: "Error: Cannot understand (invalid UID)",
    CANNOT_UNDERSTAND_UID_MISMATCH: "Error: Cannot understand (UID mismatch)",
    CANNOT_UNDERSTAND_TOO_LARGE: "Error: Cannot understand (instance too large)",
}


def status_category(status: int) -> str:
    """Return the PS3.7 Annex C category of a DIMSE status."""
    if status == SUCCESS:
        return "success"
    if status in (0x0001,) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status in (0xFE00,):
        return "cancel"
    if status in (0xFF00, 0xFF01):
        return "pending"
    return "failure"


# PS3.8 Section 9.3.4, Table 9-21: A-ASSOCIATE-RJ fields.
REJECT_RESULT_PERMANENT = 0x01
REJECT_RESULT_TRANSIENT = 0x02
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_SOURCE_SERVICE_PROVIDER_ACSE = 0x02
REJECT_SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REJECT_REASON_NO_REASON = 0x01
REJECT_REASON_CALLING_AE_NOT_RECOGNIZED = 0x03
REJECT_REASON_CALLED_AE_NOT_RECOGNIZED = 0x07
REJECT_REASON_TEMPORARY_CONGESTION = 0x01  # with source "service provider (presentation)"
REJECT_REASON_LOCAL_LIMIT_EXCEEDED = 0x02  # with source "service provider (presentation)"
