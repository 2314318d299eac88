"""Structured logging: JSON lines on stdout when not on a terminal, console output on one.

Every event has a name (the structlog ``event`` key) documented in docs/events.md.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, TextIO, cast

import structlog
from structlog.typing import FilteringBoundLogger, Processor

LogFormat = Literal["auto", "json", "console"]
Logger = FilteringBoundLogger


def configure(
    *,
    fmt: LogFormat = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    screen: Processor | None = None,
) -> None:
    """Configure structlog for this process. Safe to call again (SIGHUP reload).

    ``screen`` sees every event before it is written, and may drop it (structlog.DropEvent).
    """
    out = stream if stream is not None else sys.stdout
    if fmt == "auto":
        fmt = "console" if out.isatty() else "json"
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(sort_keys=False)
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            *([screen] if screen is not None else []),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.WriteLoggerFactory(file=out),  # flushes every line
        cache_logger_on_first_use=False,
    )


def get_logger(**context: Any) -> Logger:
    """A logger with ``context`` bound to every line it writes.

    Context that holds for a whole unit of work (a build's ``build_id``) is bound once with
    :func:`bound_context` instead, and every logger in that unit carries it.
    """
    return cast(Logger, structlog.get_logger("tfmerge").bind(**context))


@contextmanager
def bound_context(**context: Any) -> Iterator[None]:
    """Add ``context`` to every line logged inside the block, in this thread of work."""
    with structlog.contextvars.bound_contextvars(**context):
        yield
