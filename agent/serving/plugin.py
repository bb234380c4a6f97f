"""The vLLM plugin: a load format that loads each weight file as soon as the agent has verified it.

vLLM calls `register` in every one of its processes (the `vllm.general_plugins` entry point `simswarm`
of this package). It registers the load format `simswarm`, which `serve` passes to vLLM when it starts
vLLM before the weights have arrived; with any other load format, or without the agent's environment,
the plugin changes nothing.

- In the worker, `ArrivingWeightsLoader` is vLLM's own `DefaultModelLoader`: for the model the agent is
  pulling, it waits for each weight file in vLLM's read order until the arrivals record says it passed
  its check, then hands that one file to vLLM's own iterator, so the first shard loads while later
  ones arrive. Any other weight source waits for the whole pull, then loads as vLLM would.
- In vLLM's main process (the pod's main process, where the agent ran), a watcher thread reads the
  background pull's status pipe and collects it when it ends. When the pull fails, the agent has
  already printed its one line; the watcher stops vLLM's processes and exits with the agent's exit
  code, so the pod ends with the agent's error rather than a hang or a page of vLLM traceback.

Supported: vLLM 0.32 (`agent.serving.release`), whose `register_model_loader` and
`DefaultModelLoader._prepare_weights(model, subfolder, revision, fall_back_to_pt, overrides)` this
relies on. `agent.serving.probe` checks the version before `serve` asks for the load format.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Generator
from typing import Any

from agent.serving.arrivals import (
    ENV_ARRIVALS,
    ENV_BACKGROUND_PID,
    ENV_MAIN_PID,
    ENV_STATUS_FD,
    LOAD_FORMAT,
    Arrivals,
    process_alive,
    read_arrivals,
)

POLL_SECONDS = 0.05
# After the background pull is gone, how long a worker still waiting gives vLLM's main process (whose
# watcher stops everything with the agent's exit code) before it raises on its own.
GRACE_SECONDS = 10.0
STOP_EXIT = 3  # the agent's "not available", when the background pull vanished without a word

_registered = False
_watching = False


def register() -> None:
    """vLLM's entry point: may run several times per process, and in every vLLM process."""
    global _registered
    if not _registered:
        _registered = True
        _register_loader()
    register_in_main_process()


def register_in_main_process() -> None:
    """In the pod's main process (where the agent exec'd vLLM), follow the background pull."""
    if os.environ.get(ENV_MAIN_PID) == str(os.getpid()):
        start_watcher()


def log(message: str) -> None:
    sys.stderr.write(f"simswarm-agent: {message}\n")
    sys.stderr.flush()


class WeightsNotArrived(RuntimeError):
    """The background pull ended without delivering a weight file vLLM is waiting for."""


def current_arrivals() -> Arrivals | None:
    path = os.environ.get(ENV_ARRIVALS)
    return read_arrivals(path) if path else None


def wait_for(relpath: str | None) -> Arrivals | None:
    """Block until `relpath` is ready (None: until the whole pull has ended well). Returns the last
    record read (None once the pull has removed it, having ended well); raises WeightsNotArrived when the
    pull failed or is gone without the file."""
    path = os.environ.get(ENV_ARRIVALS, "")
    pid = int(os.environ.get(ENV_BACKGROUND_PID, "0") or 0)
    gone_since: float | None = None
    while True:
        arrivals = read_arrivals(path)
        if arrivals is None:  # removed: the pull ended well, every file is in place
            return None
        if arrivals.done or (relpath is not None and relpath in arrivals.ready):
            return arrivals
        if arrivals.failed or not process_alive(pid):
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since > GRACE_SECONDS:
                why = arrivals.error or "the background pull ended without a word"
                raise WeightsNotArrived(f"{relpath or 'the weights'} did not arrive: {why}")
        time.sleep(POLL_SECONDS)


def is_arriving_model(arrivals: Arrivals, model: str) -> bool:
    """Whether vLLM's model (the repo id, or the snapshot path it resolved offline) is the one pulled."""
    if model == arrivals.repo_id:
        return True
    with contextlib.suppress(OSError):
        return os.path.realpath(model) == os.path.realpath(arrivals.snapshot)
    return False


def _register_loader() -> None:
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    @register_model_loader(LOAD_FORMAT)
    class ArrivingWeightsLoader(DefaultModelLoader):  # type: ignore[misc]
        """vLLM's default loader, fed one verified file at a time while the pull goes on."""

        def __init__(self, load_config: Any) -> None:
            # vLLM's weights iterator knows its own formats only ("Unknown load_format" otherwise):
            # the files are what `auto` would read, so the loader runs as `auto`.
            super().__init__(dataclasses.replace(load_config, load_format="auto"))
            self._one_file: tuple[str, list[str], bool, str] | None = None

        def _prepare_weights(self, model_name_or_path: str, subfolder: str | None, revision: str | None,
                             fall_back_to_pt: bool, allow_patterns_overrides: list[str] | None
                             ) -> tuple[str, list[str], bool, str]:
            if self._one_file is not None:
                return self._one_file
            if current_arrivals() is not None:
                wait_for(None)  # a source the record does not cover: the whole pull first
            result: tuple[str, list[str], bool, str] = super()._prepare_weights(
                model_name_or_path, subfolder, revision, fall_back_to_pt, allow_patterns_overrides)
            return result

        def _get_weights_iterator(self, source: Any) -> Generator[tuple[str, Any], None, None]:
            arrivals = current_arrivals()
            if (arrivals is None or not arrivals.weights or source.subfolder is not None
                    or source.allow_patterns_overrides is not None
                    or not is_arriving_model(arrivals, source.model_or_path)):
                iterator: Generator[tuple[str, Any], None, None] = super()._get_weights_iterator(source)
                return iterator
            return self._arriving(source, arrivals)

        def _arriving(self, source: Any, arrivals: Arrivals) -> Generator[tuple[str, Any], None, None]:
            from vllm.model_executor.model_loader.weight_utils import SAFE_WEIGHTS_INDEX_NAME

            for relpath in arrivals.weights:
                started = time.monotonic()
                wait_for(relpath)
                waited = time.monotonic() - started
                if waited > 0.5:
                    log(f"waited {waited:.1f}s for {relpath} (verified, now loading)")
                path = arrivals.path_of(relpath)
                self._one_file = (arrivals.snapshot, [path], relpath.endswith(".safetensors"),
                                  SAFE_WEIGHTS_INDEX_NAME)
                try:
                    iterator = super()._get_weights_iterator(source)  # vLLM's own loading, this file
                finally:
                    self._one_file = None
                yield from iterator


def start_watcher() -> None:
    """In vLLM's main process: follow the background pull to its end (once per process)."""
    global _watching
    fd = os.environ.get(ENV_STATUS_FD, "")
    pid = os.environ.get(ENV_BACKGROUND_PID, "")
    if _watching or not fd.isdigit() or not pid.isdigit():
        return
    _watching = True
    threading.Thread(target=watch, args=(int(fd), int(pid)), name="simswarm-watch", daemon=True).start()


def read_status(fd: int) -> dict[str, Any]:
    """The background pull's last status message, once its pipe is closed (it has ended)."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 4096):
            data += chunk
    with contextlib.suppress(OSError):
        os.close(fd)
    last: dict[str, Any] = {}
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
            last = json.loads(line)
    return last


def collect(pid: int) -> int | None:
    """The background pull's exit code (None: another part of vLLM collected it first)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def watch(fd: int, pid: int) -> None:
    status = read_status(fd)
    code = collect(pid)
    if code is None:
        code = int(status.get("exit_code", STOP_EXIT))
    if code == 0:
        log("every weight file has arrived and passed its check")
        return
    if code < 0:  # killed by a signal: as a shell reports it
        code = 128 - code
    stop_vllm(code, str(status.get("error") or f"the background pull ended with exit {code}"))


def stop_vllm(code: int, why: str) -> None:
    """End vLLM's processes and this one with the agent's exit code (its line is already in the log)."""
    log(f"stopping vLLM: the weights cannot be had ({why}); exit {code}")
    try:
        import psutil

        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                child.send_signal(signal.SIGKILL)
    except ImportError:
        pass
    os._exit(code)
