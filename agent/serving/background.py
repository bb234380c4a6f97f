"""`serve`'s overlapped start: the pull runs in a background process while vLLM starts.

The story:
1. `start` forks before anything else has run (no thread, no connection, no native runtime exists
   yet, so the child is a clean copy). The child is the background pull; it asks the kernel for
   SIGTERM when the pod's main process ends (`PR_SET_PDEATHSIG`), so a SIGTERM or SIGKILL of the
   pod ends it too, and its SIGTERM handling stops its workers and keeps what it wrote for the next
   start, as an interrupted `pull` does.
2. The child runs the same pull as `pull` does (`pull_with_fallback`), with a `ServeHandoff`: the
   files vLLM reads before any weight (everything but weight files: configs, tokenizer, chat template,
   the weights index, `*.py`) come first, are verified, linked, and the ref written; the handoff then
   writes the arrivals record and reports `first` on the status pipe. The weights follow in vLLM's read
   order, and the record is rewritten as each one passes its check and is linked.
3. The parent, the pod's main process, waits for the first report, then execs vLLM with the plugin's
   load format (same pid, as before). The status pipe's read end survives the exec: the plugin's
   watcher in vLLM's main process reads it and collects the child.
4. When the pull ends, the child writes the `--report` file and the summary (JSON lines in the pod's
   log), removes the record (or marks it failed, with the agent's one line), reports `done` or
   `failed` on the pipe, and exits with the agent's exit code.

A warm cache, or a pull the Hub fallback served, reports `done` with no `first`: the parent then
execs vLLM with its default loader, nothing left running. A vLLM without the plugin also gets the
default loader, after the whole pull (today's order).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cache import RepoCache, atomic_write
from agent.errors import Interrupted, failure_line
from agent.output import Output
from agent.pull import PullResult
from agent.remote import StagedSnapshot
from agent.selection import NoWeights, is_weight_file, vllm_weights
from agent.serving.arrivals import Arrivals, natural_key, record_path

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """SIGTERM to this process when the thread that forked it ends (the pod's main process)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def send(fd: int, message: dict[str, Any]) -> None:
    with contextlib.suppress(OSError):  # nobody listens any more: vLLM has ended
        os.write(fd, (json.dumps(message) + "\n").encode())


@dataclass
class ServeHandoff:
    """The pull's `Handoff` for serve: what goes first, the record, the reports on the status pipe."""

    status_fd: int
    out: Output
    load_format: str
    arrivals: Arrivals | None = None  # set once the first files are in place
    cache: RepoCache | None = None
    blob_of: dict[str, str] = field(default_factory=dict)  # weight path -> blob name

    @property
    def record(self) -> Path | None:
        if self.cache is None or self.arrivals is None:
            return None
        return record_path(self.cache.state, self.arrivals.commit)

    def first(self, path: str) -> bool:
        return not is_weight_file(path)

    def reading_order(self, paths: list[str]) -> list[str]:
        # vLLM reads the top-level weights in natural order; files in subfolders (other sources) later.
        return sorted(paths, key=lambda p: (p.count("/"), natural_key(p), p))

    def placed_first(self, cache: RepoCache, snap: StagedSnapshot) -> None:
        weights = self.weights_vllm_reads(cache, snap)
        self.cache = cache
        self.blob_of = {p: snap.manifest.files[p].blob_name for p in weights}
        self.arrivals = Arrivals(os.getpid(), snap.repo_id, snap.commit, str(cache.snapshot_dir(snap.commit)),
                                 weights)
        record = record_path(cache.state, snap.commit)
        atomic_write(record, self.arrivals.to_json())
        self.out.event("serve.first", f"{snap.repo_id}@{snap.commit[:12]}: configs and tokenizer in place; "
                       f"starting vLLM while {len(weights)} weight files arrive",
                       weights=weights, arrivals=str(record))
        self.out.json_mode = True  # from here on the pod's log is vLLM's too: one JSON line per event
        send(self.status_fd, {"stage": "first", "arrivals": str(record), "commit": snap.commit})

    def weights_vllm_reads(self, cache: RepoCache, snap: StagedSnapshot) -> list[str]:
        """vLLM's default loader's files, in its order; none when it would find none (the plugin then
        waits for the whole pull and lets vLLM choose)."""
        snapshot = cache.snapshot_dir(snap.commit)

        def read_index(relpath: str) -> bytes | None:
            try:
                return (snapshot / relpath).read_bytes()
            except OSError:
                return None
        try:
            found = vllm_weights(snap.manifest.files, self.load_format, read_index)
        except NoWeights:
            return []
        return sorted(found.files, key=natural_key)

    def arrived(self, blob_name: str) -> None:
        record = self.record
        if self.arrivals is None or self.cache is None or record is None:
            return
        paths = [p for p, b in self.blob_of.items() if b == blob_name and p not in self.arrivals.ready]
        if not paths:
            return
        for path in paths:  # the link first: a path in `ready` must open
            self.cache.link(self.arrivals.commit, path, blob_name)
        self.arrivals.ready = [p for p in self.arrivals.weights if p in self.arrivals.ready or p in paths]
        atomic_write(record, self.arrivals.to_json())

    def ended_well(self, commit: str) -> None:
        if self.record is not None:
            with contextlib.suppress(FileNotFoundError):
                self.record.unlink()
        send(self.status_fd, {"stage": "done", "exit_code": 0, "commit": commit})

    def failed(self, code: int, line: str) -> None:
        record = self.record
        if self.arrivals is not None and record is not None:
            self.arrivals.exit_code, self.arrivals.error = code, line
            with contextlib.suppress(OSError):
                atomic_write(record, self.arrivals.to_json())
        send(self.status_fd, {"stage": "failed", "exit_code": code, "error": line})


PullFn = Callable[[ServeHandoff], PullResult]
FinishFn = Callable[[PullResult], None]


def run_child(parent: int, status_fd: int, out: Output, load_format: str, pull: PullFn, finish: FinishFn,
              debug: bool) -> int:
    """The background pull, to its end; returns its exit code (the agent's, as `pull` would exit)."""
    handoff = ServeHandoff(status_fd, out, load_format)
    try:
        die_with_parent(parent)
        result = pull(handoff)
        finish(result)
        handoff.ended_well(result.commit)
        return 0
    except (Interrupted, KeyboardInterrupt, Exception) as exc:  # as the CLI does: one line, one code
        line, code = failure_line(exc, debug=debug)
    out.error(line, code)
    handoff.failed(code, line)
    return code


@dataclass
class Background:
    """The parent's view of the background pull: its pid and the read end of its status pipe."""

    pid: int
    status_fd: int
    buffer: bytes = b""

    def next_report(self) -> dict[str, Any] | None:
        """The next status message (None: the pipe closed without one). Reads a byte at a time, so
        nothing after the message is taken from the pipe: vLLM's watcher reads the rest after the exec."""
        line = b""
        while not line.endswith(b"\n"):
            chunk = os.read(self.status_fd, 1)
            if not chunk:
                return None
            line += chunk
        try:
            message: dict[str, Any] = json.loads(line)
        except ValueError:
            return None
        return message

    def wait(self) -> int:
        """The background pull's exit code, once it has ended."""
        _, status = os.waitpid(self.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        return 128 - code if code < 0 else code

    def stop(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        return self.wait()


def start(load_format: str, out: Output, pull: PullFn, finish: FinishFn, *,
          debug: bool = False) -> Background:
    """Fork the background pull; in the parent, returns how to follow it (the child never returns)."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the background pull
        code = 1
        try:
            os.close(read_fd)
            code = run_child(parent, write_fd, out, load_format, pull, finish, debug)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    return Background(pid, read_fd)
