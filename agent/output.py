"""Human text on a terminal, JSON lines elsewhere (the pod's log). Never a secret, never a URL query.

Every stage event goes through `Output.event(name, message, **fields)`: a person sees the message, a log
collector sees one JSON object per line with the same fields.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from types import TracebackType
from typing import IO, Any

from agent.redact import redact_url


def _scrub(value: Any) -> Any:
    """Drop query strings from anything that looks like a URL (presigned signatures are credentials)."""
    if isinstance(value, str) and "://" in value and "?" in value:
        return redact_url(value)
    return value


class Output:
    def __init__(self, stream: IO[str] | None = None, *, json_mode: bool | None = None,
                 quiet: bool = False) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.json_mode = (not self.stream.isatty()) if json_mode is None else json_mode
        self.quiet = quiet

    @property
    def interactive(self) -> bool:
        return not self.json_mode and not self.quiet

    def event(self, name: str, message: str, **fields: Any) -> None:
        if self.json_mode:
            record = {"ts": round(time.time(), 3), "event": name, "message": message}
            record.update({k: _scrub(v) for k, v in fields.items()})
            self.stream.write(json.dumps(record, default=str) + "\n")
        elif not self.quiet:
            self.stream.write(message + "\n")
        self.stream.flush()

    def error(self, line: str, exit_code: int) -> None:
        if self.json_mode:
            self.event("error", line, exit_code=exit_code)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()


class Progress:
    """A byte counter: tqdm's bar on a terminal (the bar huggingface_hub users know), a `progress` JSON
    line every few seconds otherwise, and nothing when quiet. tqdm is imported only for the bar, so the
    JSON-lines path (a pod's log) pays nothing for it."""

    def __init__(self, out: Output, total: int, label: str = "pull", interval: float = 5.0) -> None:
        self.out = out
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.interval = interval
        self._last_event = self.started  # first JSON sample after one interval, when the rate means something
        self._bar: Any = None
        if out.interactive and total:
            from tqdm import tqdm

            # No ETA before tqdm has a rate to go on; smoothing keeps it from swinging with each chunk.
            self._bar = tqdm(total=total, desc=label, unit="B", unit_scale=True, unit_divisor=1024,
                             file=out.stream, dynamic_ncols=True, mininterval=0.2, smoothing=0.1,
                             leave=True)

    def __call__(self, delta: int) -> None:
        self.done += delta
        if self._bar is not None:
            self._bar.update(delta)
            return
        if self.out.json_mode:
            now = time.monotonic()
            if now - self._last_event >= self.interval:
                self._last_event = now
                self.out.event("progress", "progress", bytes=self.done, total=self.total,
                               bytes_per_second=int(self.rate(now)))

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Spinner:
    """A slow step that shows it is alive: a turning mark and the seconds spent, redrawn in place on a
    terminal, then one line saying how long it took; elsewhere one plain event line (a pod log or a
    JSON consumer wants no carriage returns)."""

    FRAMES = "|/-\\"

    def __init__(self, out: Output, name: str, message: str, interval: float = 0.1) -> None:
        self.out = out
        self.name = name
        self.message = message
        self.interval = interval
        self.started = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Spinner:
        self.started = time.monotonic()
        if not (self.out.interactive and self.out.stream.isatty()):
            self.out.event(self.name, self.message)
            return self
        self._thread = threading.Thread(target=self._spin, name="spinner", daemon=True)
        self._thread.start()
        return self

    def _spin(self) -> None:
        frame = 0
        while True:
            elapsed = time.monotonic() - self.started
            self.out.stream.write(f"\r{self.FRAMES[frame % len(self.FRAMES)]} {self.message} {elapsed:.0f}s ")
            self.out.stream.flush()
            frame += 1
            if self._stop.wait(self.interval):
                return

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        outcome = "failed after" if exc_type is not None else "done in"
        self.out.stream.write(f"\r{self.message} {outcome} {time.monotonic() - self.started:.1f}s\x1b[K\n")
        self.out.stream.flush()


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
