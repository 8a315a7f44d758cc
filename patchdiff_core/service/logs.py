"""One log format for the API, the workers and `patchdiff serve`: JSON lines (python-json-logger) with
a timestamp, the level, the logger, and whatever `extra=` a call adds (job_id, attempt, worker, ...).
`PATCHDIFF_LOG_FORMAT=text` gives plain lines for a terminal."""

from __future__ import annotations

import logging
import sys

from patchdiff_core.service.settings import Settings


def configure_logging(settings: Settings, process: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"process": process},
        ))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # Library loggers: through our handler, and quieter.
    for name in ("uvicorn", "uvicorn.error"):
        lib = logging.getLogger(name)
        lib.handlers[:] = []
        lib.propagate = True
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
