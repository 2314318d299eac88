"""A worker's stderr relayed as worker_output events, through a real pipe and a real thread.

The daemon's end-to-end test (tests/test_daemon.py) runs the same relay on real workers.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from tfmerge.daemon.output import MAX_LINE_BYTES, OutputRelay

pytestmark = pytest.mark.timeout(60)

#: What one TensorFlow import wrote on a host without a GPU, and what came after it.
TENSORFLOW_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796305358.105789   19087 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.",
    "I0000 00:00:1796305359.212376   19087 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796305361.553489   19087 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
    "W1203 13:48:09.558029   19087 graph.cc:12] a warning",
    "E1203 13:48:09.600000   19087 session.cc:7] a real error",
    "F1203 13:48:10.000001   19087 check.cc:99] Check failed: x == y",
]


@pytest.fixture(autouse=True)
def default_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    structlog.configure(**saved)


def relay(chunks: list[bytes], *, context: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write ``chunks`` into the pipe one write each, close it, and return what was logged."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    never_ends_r, never_ends_w = os.pipe()
    try:
        with capture_logs(processors=[merge_contextvars]) as events:
            output = OutputRelay(reader, ended=never_ends_r, worker_pid=4242)
            output.context = context or {}
            output.start()
            for chunk in chunks:
                os.write(writer.fileno(), chunk)
            writer.close()
            output.join()
    finally:
        os.close(never_ends_r)
        os.close(never_ends_w)
    assert reader.closed
    return events


def test_each_line_is_an_event_with_the_level_of_its_prefix() -> None:
    data = "".join(f"{line}\n" for line in TENSORFLOW_LINES).encode()
    # Written in pieces that cut lines in two, as a pipe may deliver them.
    events = relay([data[:50], data[50:333], data[333:]], context={"build_id": "b-1"})
    # The failed GPU probe is info: a host without a GPU builds on the CPU, as meant.
    assert [(e["log_level"], e["text"]) for e in events] == list(
        zip(
            ["warning", "info", "info", "info", "info", "warning", "error", "critical"],
            TENSORFLOW_LINES,
            strict=True,
        )
    )
    assert all(e["event"] == "worker_output" for e in events)
    assert all((e["worker_pid"], e["build_id"]) == (4242, "b-1") for e in events)


def test_python_warnings_and_tracebacks_name_their_level() -> None:
    lines = [
        "/srv/app/x.py:12: UserWarning: something odd",
        "  warnings.warn('something odd')",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in <module>',
        "ValueError: bad",
    ]
    events = relay(["\n".join(lines).encode()])  # the last line has no newline
    assert [e["log_level"] for e in events] == ["warning", "warning", "error", "error", "error"]
    assert [e["text"] for e in events] == lines
    assert "build_id" not in events[0]


def test_blank_lines_are_left_out_and_bytes_that_are_not_utf8_escaped() -> None:
    events = relay([b"\n  \nbad \xff byte\r\n\n"])
    assert [(e["log_level"], e["text"]) for e in events] == [("warning", "bad \\xff byte")]


def test_a_runaway_line_is_cut_and_does_not_grow_without_bound() -> None:
    events = relay([b"x" * (2 * MAX_LINE_BYTES), b"x" * MAX_LINE_BYTES + b"\nafter\n"])
    assert [e["text"] for e in events] == ["x" * MAX_LINE_BYTES, "after"]


def test_the_relay_ends_with_the_worker_even_if_the_pipe_stays_open() -> None:
    """A process the worker started may hold its stderr open after the worker has ended."""
    reader, writer = multiprocessing.Pipe(duplex=False)
    ended_r, ended_w = os.pipe()
    try:
        with capture_logs() as events:
            output = OutputRelay(reader, ended=ended_r, worker_pid=7)
            output.start()
            os.write(writer.fileno(), b"E0000 00:00:1.5 7 x.cc:1] last words\n")
            os.write(ended_w, b"x")  # the worker's sentinel: it has ended
            output.join()
    finally:
        writer.close()
        os.close(ended_r)
        os.close(ended_w)
    assert [(e["log_level"], e["text"]) for e in events] == [
        ("error", "E0000 00:00:1.5 7 x.cc:1] last words")
    ]
