"""JSON-lines logging for the license server: one object per line, so log shippers need no parser."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger("activeguard.license_server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields come from ``extra={"fields": {...}}``. Never pass secrets."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO") -> None:
    """Send every ``activeguard.*`` logger through one JSON handler on stderr."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("activeguard")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def log_event(level: int, msg: str, **fields: Any) -> None:
    """Log ``msg`` with structured ``fields`` (they become keys of the JSON line)."""
    log.log(level, msg, extra={"fields": fields})
