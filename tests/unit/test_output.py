"""The spinner of slow steps: frames in place on a real terminal (a pty), one plain line elsewhere."""

from __future__ import annotations

import io
import json
import os
import select
import time
from collections.abc import Callable

from agent.output import Output, Spinner


def read_until(fd: int, done: Callable[[bytes], bool], seen: bytes = b"") -> bytes:
    """What the pty shows, until `done` says enough (a deadline only stops a broken test from hanging)."""
    deadline = time.monotonic() + 30
    while not done(seen) and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            seen += os.read(fd, 4096)
    return seen


def test_on_a_terminal_the_spinner_turns_then_leaves_one_line_with_the_time() -> None:
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as terminal:
        out = Output(terminal)  # a tty: text mode, interactive
        with Spinner(out, "demo.server", "starting a server", interval=0.01):
            shown = read_until(master, lambda seen: seen.count(b"\r") >= 4)
        shown = read_until(master, lambda seen: b"done in" in seen and seen.endswith(b"\n"), shown)
    os.close(master)
    frames = [f for f in shown.decode().split("\r") if f.strip()]
    assert [f[0] for f in frames[:4]] == ["|", "/", "-", "\\"]
    assert all("starting a server" in f for f in frames)
    assert any(f.startswith("starting a server done in ") for f in frames)


def test_off_a_terminal_the_spinner_is_one_plain_line() -> None:
    for json_mode in (True, False):
        stream = io.StringIO()
        with Spinner(Output(stream, json_mode=json_mode), "demo.server", "starting a server", interval=0.01):
            time.sleep(0.05)  # long enough for frames, were it spinning
        text = stream.getvalue()
        assert "\r" not in text and text.count("\n") == 1
        line = text.strip()
        assert (json.loads(line)["message"] if json_mode else line) == "starting a server"
