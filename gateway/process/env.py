"""What every process of one gateway sets up the same way: exit codes, the names of
the environment variables the supervisor sets for its workers, the log format and
the event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time

#: Exit codes: done; found a problem (drift, a refusal); bad input; could not do the job
#: (Redis or the gateway unreachable, a port taken); a token that may not; Ctrl-C.
OK, FAILED, INVALID, UNAVAILABLE, DENIED, INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_CODES = """exit codes:
  0    done
  1    found a problem: drift (reconcile), a refusal (admin), a failed bench or demo
  2    bad config or arguments
  3    could not do the job: Redis or the gateway unreachable, a port taken
  4    the admin token may not do this (401 or 403)
  130  interrupted (Ctrl-C)"""

#: Set in workers to the supervisor's pid.
SUPERVISOR_ENV = "FLASHGATE_SUPERVISOR_PID"
#: Set for workers started in place of dead ones: see Runtime.must_exist.
RESPAWNED_ENV = "FLASHGATE_RESPAWNED"
#: Worker processes when --workers is not given.
WORKERS_ENV = "FLASHGATE_WORKERS"


def install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def configure_logging(level: str, fmt: str = "text") -> None:
    """Application logs on stderr: text lines, or (``logging: {format: json}``) one JSON
    object per line, for log shippers that parse them (the access log is separate)."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if fmt == "json":  # the handler basicConfig made (a second call: the one it made then)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
                handler.setFormatter(JsonFormatter())


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ms), level, logger, pid, message, and the
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)
