"""The pieces of serve's overlapped start that need no process: the arrivals record, vLLM's reading
order, the worker's wait, and how the probe finds vLLM's interpreter."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent.cache import atomic_write
from agent.serving import plugin
from agent.serving.arrivals import ENV_ARRIVALS, ENV_BACKGROUND_PID, Arrivals, natural_key, read_arrivals
from agent.serving.probe import interpreter_of


def record(tmp_path: Path, **changes: object) -> Arrivals:
    arrivals = Arrivals(os.getpid(), "org/name", "a" * 40, str(tmp_path / "snap"),
                        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"])
    for key, value in changes.items():
        setattr(arrivals, key, value)
    return arrivals


def test_the_record_reads_back_and_anything_else_reads_as_none(tmp_path: Path) -> None:
    path = tmp_path / "state" / "arrivals.json"
    arrivals = record(tmp_path, ready=["model-00001-of-00002.safetensors"])
    atomic_write(path, arrivals.to_json())
    assert read_arrivals(path) == arrivals
    for text in ("", "{", '{"format_version": 2}', '{"format_version": 1, "pid": 1}', "[]"):
        path.write_text(text)
        assert read_arrivals(path) is None, text
    assert read_arrivals(tmp_path / "missing.json") is None
    assert [p.name for p in path.parent.iterdir()] == ["arrivals.json"]  # no temporary left


def test_weights_come_in_vllms_natural_order() -> None:
    names = ["model-00010-of-00011.safetensors", "model-00002-of-00011.safetensors",
             "model-00001-of-00011.safetensors"]
    assert sorted(names, key=natural_key) == sorted(names, key=lambda n: int(n[6:11]))


def test_a_worker_waits_for_its_file_and_no_longer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "arrivals.json"
    arrivals = record(tmp_path)
    atomic_write(path, arrivals.to_json())
    monkeypatch.setenv(ENV_ARRIVALS, str(path))
    monkeypatch.setenv(ENV_BACKGROUND_PID, str(os.getpid()))

    def arrive() -> None:
        time.sleep(0.3)
        arrivals.ready = ["model-00001-of-00002.safetensors"]
        atomic_write(path, arrivals.to_json())
    writer = threading.Thread(target=arrive)
    writer.start()
    seen = plugin.wait_for("model-00001-of-00002.safetensors")
    writer.join()
    assert seen is not None and seen.ready == ["model-00001-of-00002.safetensors"]
    path.unlink()  # the pull ended well and removed its record
    assert plugin.wait_for("model-00002-of-00002.safetensors") is None


def test_a_worker_gives_up_with_the_agents_line_once_the_pull_has_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "arrivals.json"
    atomic_write(path, record(tmp_path, exit_code=3, error="error: blob abc stalled").to_json())
    monkeypatch.setenv(ENV_ARRIVALS, str(path))
    monkeypatch.setenv(ENV_BACKGROUND_PID, "999999999")  # no such process
    monkeypatch.setattr(plugin, "GRACE_SECONDS", 0.1)
    with pytest.raises(plugin.WeightsNotArrived, match="blob abc stalled"):
        plugin.wait_for("model-00001-of-00002.safetensors")


@pytest.mark.parametrize(("first_line", "expected"), [
    ("#!/opt/venv/bin/python3.11\n", "/opt/venv/bin/python3.11"),
    ("#!/usr/bin/env python3\n", "python3"),
    ("#!/bin/sh\n", None),
    ("not a script\n", None),
])
def test_the_probe_finds_vllms_interpreter_from_its_script(tmp_path: Path, first_line: str,
                                                          expected: str | None) -> None:
    script = tmp_path / "vllm"
    script.write_text(first_line + "import vllm\n")
    assert interpreter_of(str(script)) == expected
    assert interpreter_of(str(tmp_path / "missing")) is None
