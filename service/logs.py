"""Structured logs: one JSON object per line, each carrying the slot and the model version,
so a log pipeline can split blue from green without parsing prose."""

from __future__ import annotations

import json
import logging
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, slot: str, model: str, version: str) -> None:
        super().__init__()
        self.static = {"slot": slot, "model": model, "model_version": version}

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self.static,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def install_json_logs(slot: str, model: str, version: str) -> None:
    """Give every handler this worker logs through (BentoML's included) the JSON formatter."""
    formatter = JsonFormatter(slot, model, version)
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            handler.setFormatter(formatter)
