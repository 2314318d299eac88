"""A worker's stderr, relayed line by line as ``worker_output`` events. No TensorFlow here.

TensorFlow's C++ runtime logs through absl straight to file descriptor 2, past Python and
structlog: ``I0000 00:00:1700000000.123456  4242 cudart_stub.cc:31] Could not find cuda
drivers …`` at every import. Written as they are, such lines break a log of JSON lines
(``journalctl -o cat | jq`` stops at the first). So each worker's fd 2 is a pipe, read by a
thread of the supervisor that logs every line as an event: the level from absl's prefix
(I, W, E, F), the text as written. The one exception is the failed probe for a GPU on a
host without one: absl says error, and it is info here.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping
from multiprocessing.connection import Connection, wait
from typing import Any

from tfmerge.logs import bound_context, get_logger

#: absl's prefix: severity, MMDD, time (TensorFlow's reads 00:00:<epoch seconds>), thread
#: id, file:line.
_ABSL_PREFIX = re.compile(r"^([IWEF])\d{4} [0-9:.]+ +\d+ [^ \]]+:\d+\] ")
_ABSL_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
#: TensorFlow's probe for a GPU, an absl error on every host without one. A build runs on
#: the CPU then, as it is meant to: no fault of the service, so not an error in its log.
_GPU_PROBE = re.compile(r"\] failed call to cuInit: ")
#: Python's own: a warning (``file.py:12: UserWarning: …``), an uncaught exception.
_PYTHON_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
_FIRST_WORDS = {
    "WARNING:": logging.WARNING,
    "ERROR:": logging.ERROR,
    "FATAL:": logging.CRITICAL,
    "Traceback (most recent call last):": logging.ERROR,
}
#: Output that names no level is a diagnostic all the same.
DEFAULT_LEVEL = logging.WARNING
#: A longer line is cut here: one runaway line must not grow the supervisor's memory.
MAX_LINE_BYTES = 16 * 1024
_READ_BYTES = 64 * 1024


def line_level(line: str, previous: int) -> int:
    """The level of one line of output; ``previous`` (the line before's) for a line that
    names none, which continues a message of several lines."""
    match = _ABSL_PREFIX.match(line)
    if match:
        return logging.INFO if _GPU_PROBE.search(line) else _ABSL_LEVELS[match[1]]
    if _PYTHON_WARNING.match(line):
        return logging.WARNING
    for words, level in _FIRST_WORDS.items():
        if line.startswith(words):
            return level
    return previous


class OutputRelay:
    """Logs each line read from ``pipe`` until the writer closes it or ``ended`` is readable.

    ``ended`` is the worker's process sentinel: once the worker is gone and its output read,
    the relay ends even if a process the worker started still holds the pipe open.
    """

    def __init__(self, pipe: Connection, *, ended: int, worker_pid: int | None) -> None:
        self._pipe = pipe
        self._ended = ended
        self._worker_pid = worker_pid
        #: Bound to each event: the build the worker runs, once it runs one.
        self.context: Mapping[str, Any] = {}
        self._thread = threading.Thread(
            target=self._relay, name=f"tfmerge-worker-output-{worker_pid}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def join(self) -> None:
        self._thread.join()

    def _relay(self) -> None:
        level = DEFAULT_LEVEL
        pending = b""
        cut = False  # in a line already logged up to MAX_LINE_BYTES: drop the rest of it
        fd = self._pipe.fileno()
        try:
            while True:
                if fd not in wait([fd, self._ended]):
                    break  # the worker has ended and everything it wrote is read
                data = os.read(fd, _READ_BYTES)
                if not data:
                    break
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if not cut:
                        level = self._log(line, level)
                    cut = False
                if len(pending) > MAX_LINE_BYTES:
                    if not cut:
                        level = self._log(pending, level)
                    cut, pending = True, b""
            if pending and not cut:
                self._log(pending, level)
        finally:
            self._pipe.close()

    def _log(self, raw: bytes, previous: int) -> int:
        text = raw[:MAX_LINE_BYTES].decode("utf-8", "backslashreplace").rstrip("\r")
        if not text.strip():
            return previous
        level = line_level(text, previous)
        with bound_context(**self.context):
            get_logger().log(level, "worker_output", worker_pid=self._worker_pid, text=text)
        return level
