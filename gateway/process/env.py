"""What every process of one gateway sets up the same way: exit codes, the names of
the environment variables the supervisor sets for its workers, the log format and
the event loop."""

from __future__ import annotations

import asyncio
import logging
import sys

#: Exit codes: done; found a problem (drift); bad input; could not do the job (Redis
#: unreachable, a port taken).
OK, FAILED, INVALID, UNAVAILABLE = 0, 1, 2, 3

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


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(process)d %(name)s: %(message)s",
        stream=sys.stderr,
    )
