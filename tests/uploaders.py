"""Real uploaders for the tests: child processes that write a file as upload tools do.

Run as a script (``python tests/uploaders.py MODE PATH [SOURCE]``), one mode per pattern:

* ``hold``: open PATH for writing (created if missing, never truncated) and keep it open.
* ``inplace``: what OpenSSH's scp does to an existing file: open it without ``O_TRUNC``,
  write SOURCE's bytes over the old ones from the start, and cut the file to length only at
  the very end. It stops half-way until told to go on, so a test decides when it finishes (or
  kills it there: a killed upload leaves new bytes first and old bytes after).
* ``open``: open PATH for writing once and close it (blocks while a read lease is broken).

Each step is announced on stdout (``opened``, ``half``, ``closed``); a line on stdin lets the
uploader go on. No sleeps: the test and the uploader wait on each other.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import TracebackType


class Uploader:
    """One uploader child process; always ended when the ``with`` block is left."""

    def __init__(self, mode: str, path: Path, source: Path | None = None) -> None:
        args = [sys.executable, __file__, mode, str(path)]
        if source is not None:
            args.append(str(source))
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def wait_for(self, word: str) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        assert line == word, f"the uploader said {line!r}, expected {word!r}"

    def go_on(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> None:
        """Let it write the rest, cut the file to length and close it."""
        self.go_on()
        self.wait_for("closed")
        self.process.wait(timeout=60)

    def kill(self) -> None:
        """End it where it is, as a lost connection ends scp (its descriptors close)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=60)

    def close(self) -> None:
        self.kill()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def __enter__(self) -> Uploader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _wait_for_go() -> None:
    sys.stdin.readline()


def main(mode: str, path: str, source: str | None = None) -> None:
    # Like scp: O_CREAT for a new file, never O_TRUNC for an existing one.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    print("opened", flush=True)
    if mode == "hold":
        _wait_for_go()
    elif mode == "inplace":
        assert source is not None
        data = Path(source).read_bytes()
        half = len(data) // 2
        os.pwrite(fd, data[:half], 0)
        print("half", flush=True)
        _wait_for_go()
        os.pwrite(fd, data[half:], half)
        os.ftruncate(fd, len(data))
    os.close(fd)
    print("closed", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
