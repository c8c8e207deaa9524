"""Log lines for people (`text`) or machines (`json`), and one access line per request.

Only what is safe goes out: method, path, status, bytes, duration, cache result, client
address. Never headers (they carry Authorization), never tokens, never credentials.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class AccessLogger(AbstractAccessLogger):
    """`GET /v2/library/alpine/manifests/3.19 200 1234B 0.004s hit` (or the same as JSON fields)."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": request.path,
            "status": response.status,
            "bytes": response.body_length,
            "duration_s": round(time, 6),
            "cache": request.get("cache", "-"),
        }
        self.logger.info(
            "%s %s %s %d %dB %.3fs %s",
            fields["remote"], fields["method"], fields["path"], fields["status"],
            fields["bytes"], time, fields["cache"],
            extra={"fields": fields},
        )  # fmt: skip
