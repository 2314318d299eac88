"""The sd_notify client against real unix datagram sockets, in-process and from a child process."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import tfmerge
from tfmerge.daemon.notify import MAX_DATAGRAM_BYTES, Notifier

PACKAGE_ROOT = Path(tfmerge.__file__).resolve().parent.parent
RECEIVE_TIMEOUT = 30.0


@dataclass
class Datagram:
    data: bytes
    sender_pid: int


class Receiver:
    """Plays systemd's side: a bound datagram socket that also learns each sender's pid."""

    def __init__(self, address: str | bytes, notify_socket: str) -> None:
        self.notify_socket = notify_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        # systemd matches a notification to its unit by the kernel-supplied sender credentials.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)

    def receive(self, timeout: float = RECEIVE_TIMEOUT) -> Datagram:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no datagram on {self.notify_socket} within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                data, ancillary, flags, _ = self.sock.recvmsg(
                    2 * MAX_DATAGRAM_BYTES, socket.CMSG_SPACE(struct.calcsize("iII"))
                )
            except TimeoutError:
                continue
            assert not flags & socket.MSG_TRUNC
            pids = [
                struct.unpack("iII", payload)[0]
                for level, kind, payload in ancillary
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            ]
            assert len(pids) == 1
            return Datagram(data, pids[0])

    def assert_empty(self) -> None:
        """Nothing else queued: a local datagram send is complete when send() returns."""
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(2 * MAX_DATAGRAM_BYTES)
        finally:
            self.sock.setblocking(True)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify"
    receiver = Receiver(str(path), str(path))
    yield receiver
    receiver.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    name = f"tfmerge-test-{secrets.token_hex(8)}"
    receiver = Receiver(b"\0" + name.encode(), "@" + name)
    yield receiver
    receiver.close()


@pytest.fixture(params=["path", "abstract"])
def receiver(request: pytest.FixtureRequest) -> Receiver:
    fixture_name = f"{request.param}_receiver"
    result: Receiver = request.getfixturevalue(fixture_name)
    return result


@pytest.fixture
def notifier(receiver: Receiver) -> Iterator[Notifier]:
    with Notifier.from_environ({"NOTIFY_SOCKET": receiver.notify_socket}) as sender:
        yield sender


@pytest.mark.parametrize(
    ("send", "expected"),
    [
        (lambda n: n.ready(), b"READY=1"),
        (lambda n: n.ready("watching /srv/frozen"), b"READY=1\nSTATUS=watching /srv/frozen"),
        (lambda n: n.status("building 4 models"), b"STATUS=building 4 models"),
        (lambda n: n.watchdog(), b"WATCHDOG=1"),
        (lambda n: n.stopping(), b"STOPPING=1"),
        (lambda n: n.stopping("draining"), b"STOPPING=1\nSTATUS=draining"),
    ],
    ids=["ready", "ready-status", "status", "watchdog", "stopping", "stopping-status"],
)
def test_each_message_is_one_exact_datagram(
    receiver: Receiver,
    notifier: Notifier,
    send: Callable[[Notifier], bool],
    expected: bytes,
) -> None:
    assert notifier.enabled
    assert send(notifier) is True
    datagram = receiver.receive()
    assert datagram.data == expected
    assert datagram.sender_pid == os.getpid()
    receiver.assert_empty()


def test_reloading_carries_the_monotonic_clock(receiver: Receiver, notifier: Notifier) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading("reloading configuration") is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = receiver.receive().data.decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert lines[2:] == ["STATUS=reloading configuration"]
    # The reload ends with READY=1 again, which Type=notify-reload waits for.
    assert notifier.ready("watching") is True
    assert receiver.receive().data == b"READY=1\nSTATUS=watching"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ok\nREADY=1", b"STATUS=ok READY=1"),
        ("one\r\ntwo\rthree", b"STATUS=one  two three"),
        ("cut\0here", b"STATUS=cut here"),
        ("model \udcff.pb", b"STATUS=model \\udcff.pb"),
    ],
    ids=["newline", "carriage-return", "nul", "undecodable-file-name"],
)
def test_status_text_cannot_add_assignments(
    path_receiver: Receiver, text: str, expected: bytes
) -> None:
    with Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket}) as notifier:
        assert notifier.status(text) is True
        assert notifier.stopping(text) is True
    assert path_receiver.receive().data == expected
    assert path_receiver.receive().data == b"STOPPING=1\n" + expected


@pytest.mark.parametrize("unit", ["x", "é", "€"], ids=["ascii", "two-byte", "three-byte"])
def test_long_status_is_shortened_to_one_acceptable_datagram(
    path_receiver: Receiver, unit: str
) -> None:
    with Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket}) as notifier:
        assert notifier.ready(unit * 5000) is True
    data = path_receiver.receive().data
    assert len(data) <= MAX_DATAGRAM_BYTES
    assert len(data) > MAX_DATAGRAM_BYTES - 3 - len(unit.encode())
    text = data.decode("utf-8")  # cut on a character boundary
    assert text.startswith("READY=1\nSTATUS=" + unit * 100)
    assert text.endswith(unit + "...")


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}], ids=["unset", "empty"])
def test_without_notify_socket_every_call_is_a_no_op(environ: dict[str, str]) -> None:
    notifier = Notifier.from_environ(environ)
    assert notifier.enabled is False
    assert notifier.unusable_reason is None
    results = [
        notifier.ready("x"),
        notifier.status("x"),
        notifier.watchdog(),
        notifier.stopping("x"),
        notifier.reloading(),
    ]
    assert results == [False] * 5
    assert notifier.last_error is None
    notifier.close()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("vsock:2:1234", "unsupported NOTIFY_SOCKET address"),
        ("run/notify", "unsupported NOTIFY_SOCKET address"),
        ("/" + "n" * 107, "socket path too long"),
        ("@" + "n" * 108, "abstract socket name too long"),
    ],
    ids=["vsock", "relative", "long-path", "long-abstract"],
)
def test_unusable_notify_socket_disables_and_says_why(value: str, reason: str) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": value})
    assert notifier.enabled is False
    assert notifier.unusable_reason is not None
    assert notifier.unusable_reason.startswith(reason)
    assert notifier.ready() is False


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "3000"}, 0.0015),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4243"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_PID": "4242"}, None),
    ],
    ids=[
        "absent",
        "thirty-seconds",
        "small",
        "our-pid",
        "another-pid",
        "garbage-pid",
        "zero",
        "negative",
        "not-a-number",
        "empty",
        "pid-only",
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_our_pid_only(
    environ: dict[str, str], interval: float | None
) -> None:
    notifier = Notifier.from_environ(environ, pid=4242)
    assert notifier.watchdog_interval == interval
    # The watchdog is independent of whether there is a socket to ping.
    assert notifier.enabled is False


def test_watchdog_pid_defaults_to_this_process() -> None:
    ours = {"WATCHDOG_USEC": "8000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier.from_environ(ours).watchdog_interval == 4.0
    theirs = {"WATCHDOG_USEC": "8000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier.from_environ(theirs).watchdog_interval is None


def test_receiver_gone_returns_false_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    receiver = Receiver(str(path), str(path))
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    try:
        assert notifier.ready() is True
        assert receiver.receive().data == b"READY=1"

        receiver.close()
        assert notifier.watchdog() is False
        assert isinstance(notifier.last_error, ConnectionRefusedError)

        path.unlink()
        assert notifier.watchdog() is False
        assert isinstance(notifier.last_error, FileNotFoundError)

        # A manager that comes back binds the same path; the next call reconnects to it.
        receiver = Receiver(str(path), str(path))
        assert notifier.status("back") is True
        assert notifier.last_error is None
        assert receiver.receive().data == b"STATUS=back"
    finally:
        notifier.close()
        receiver.close()


def test_stalled_receiver_times_out_instead_of_blocking(path_receiver: Receiver) -> None:
    address = path_receiver.notify_socket
    with Notifier(address, send_timeout=0.05) as notifier:
        # Nobody reads: the receiver's queue fills up, and then a send must give up, not hang.
        sent = 0
        while notifier.watchdog():
            sent += 1
            assert sent < 100_000, "the receiver's queue never filled up"
        assert sent > 0
        assert isinstance(notifier.last_error, TimeoutError)

        for _ in range(sent):
            assert path_receiver.receive().data == b"WATCHDOG=1"
        path_receiver.assert_empty()
        assert notifier.status("drained") is True
        assert path_receiver.receive().data == b"STATUS=drained"


def test_connects_lazily(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})
    assert notifier.enabled  # nothing is bound there yet, and creating it did not fail
    receiver = Receiver(str(path), str(path))
    try:
        assert notifier.ready() is True
        assert receiver.receive().data == b"READY=1"
    finally:
        notifier.close()
        receiver.close()


def test_closed_notifier_sends_nothing(path_receiver: Receiver) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path_receiver.notify_socket})
    assert notifier.status("before") is True
    notifier.close()
    notifier.close()
    assert notifier.enabled is False
    assert notifier.status("after") is False
    assert path_receiver.receive().data == b"STATUS=before"
    path_receiver.assert_empty()


CHILD_SCRIPT = """
import sys
from tfmerge.daemon.notify import Notifier

with Notifier.from_environ() as notifier:
    sent = [notifier.ready("serving version 3"), notifier.status("idle")]
sys.exit(0 if sent == [True, True] else 1)
"""


def test_child_process_notifies_through_its_environment(receiver: Receiver) -> None:
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}
    }
    env["NOTIFY_SOCKET"] = receiver.notify_socket
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])
    )
    with subprocess.Popen([sys.executable, "-c", CHILD_SCRIPT], env=env) as child:
        try:
            ready = receiver.receive()
            status = receiver.receive()
            returncode = child.wait(timeout=RECEIVE_TIMEOUT)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert returncode == 0
    assert ready == Datagram(b"READY=1\nSTATUS=serving version 3", child.pid)
    assert status == Datagram(b"STATUS=idle", child.pid)
    receiver.assert_empty()
