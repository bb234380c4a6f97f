"""The spinner of slow steps and the byte bar: in place on a real terminal (a pty), plain lines elsewhere."""

from __future__ import annotations

import io
import json
import os
import select
import time
from collections.abc import Callable

from agent.output import Output, Progress, Spinner


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


def test_on_a_terminal_the_byte_bar_is_tqdm_and_shows_no_eta_before_it_has_a_rate() -> None:
    stream = io.StringIO()
    progress = Progress(Output(stream, json_mode=False), 4 << 20, label="pull")
    first = stream.getvalue()  # the frame drawn before any byte moved
    for _ in range(4):
        progress(1 << 20)
    progress.close()
    assert "pull" in first and "0.00/4.00M" in first and "?" in first  # tqdm's "no estimate yet"
    last = [f for f in stream.getvalue().split("\r") if f.strip()][-1]
    assert "100%" in last and "4.00M/4.00M" in last and last.endswith("\n")


def test_off_a_terminal_progress_is_json_lines_and_never_loads_tqdm() -> None:
    import subprocess
    import sys

    code = ("import io, json, sys, time; from agent.output import Output, Progress; s = io.StringIO(); "
            "p = Progress(Output(s, json_mode=True), 10, interval=0.0); time.sleep(0.01); p(4); p.close(); "
            "print(json.dumps(['tqdm' in sys.modules, s.getvalue()]))")
    loaded, text = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                             check=True).stdout)
    assert loaded is False
    record = json.loads(text)
    assert record["event"] == "progress" and record["bytes"] == 4 and record["total"] == 10
