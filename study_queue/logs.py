"""Log line formats: human-readable by default, JSON lines with ``--log-format json`` (for a
log shipper). Every record about a study carries its ``study_key`` (passed as ``extra``):
in JSON it is a field of its own, so a study's whole story is one filter away."""
from __future__ import annotations

import datetime as _dt
import json
import logging

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, process, message, and
    ``study_key`` when the record has one; an exception as its type and traceback text."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        key = getattr(record, "study_key", None)
        if key:
            doc["study_key"] = key
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


def formatter(kind: str) -> logging.Formatter:
    return JsonFormatter() if kind == "json" else logging.Formatter(TEXT_FORMAT)
