"""Count inotify queue overflows, which watchdog 6 drops without a word. The one private hook.

When the kernel's queue of events for an inotify instance is full (``max_queued_events``,
16384 by default), it drops every further event and queues one ``IN_Q_OVERFLOW`` record, with
watch descriptor -1. watchdog 6 skips every record with descriptor -1
(``Inotify.read_events``: ``if wd == -1: continue``), so an overflow is lost with the events it
stands for, and folders created meanwhile get no watch. No public API tells.

So this module wraps ``watchdog.observers.inotify_c.Inotify._parse_event_buffer``, the static
method ``read_events`` calls by its class name to split the bytes read from the inotify
descriptor into records, and counts the overflow records it yields, passing every record on
unchanged. :func:`install` refuses loudly (``RuntimeError``) when watchdog no longer has that
method; ``tests/test_watch.py`` also checks that ``read_events`` still calls it and still
drops the record, so a watchdog upgrade that moves either fails the tests, not the daemon.

The count is per process, not per watcher: any overflow makes every watcher rescan, which is
harmless.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Final

from watchdog.observers import inotify_c

_IN_Q_OVERFLOW: Final = 0x4000
_lock = threading.Lock()
_count = 0
_original: Callable[[bytes], Iterator[tuple[int, int, int, bytes]]] | None = None


def _counting_parse(event_buffer: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    global _count  # noqa: PLW0603 - one counter for the process, as inotify's hook is one
    parse = _original
    if parse is None:  # only install() puts this function in place, after setting _original
        raise RuntimeError("tfmerge.daemon.overflow: the hook runs without watchdog's parser")
    for wd, mask, cookie, name in parse(event_buffer):
        if wd == -1 and mask & _IN_Q_OVERFLOW:
            with _lock:
                _count += 1
        yield wd, mask, cookie, name


def install() -> None:
    """Start counting (once per process; later calls do nothing)."""
    global _original  # noqa: PLW0603 - the hook is installed once per process
    with _lock:
        if _original is not None:
            return
        inotify: Any = getattr(inotify_c, "Inotify", None)
        parse = getattr(inotify, "_parse_event_buffer", None)
        if parse is None or not callable(parse):
            raise RuntimeError(
                "watchdog.observers.inotify_c.Inotify._parse_event_buffer is gone: this "
                "watchdog cannot report inotify queue overflows (tfmerge.daemon.overflow)"
            )
        _original = parse
        inotify._parse_event_buffer = staticmethod(_counting_parse)


def count() -> int:
    """How many overflow records this process has read since :func:`install`."""
    with _lock:
        return _count
