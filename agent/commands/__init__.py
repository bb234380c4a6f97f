"""One module per verb (as s5cmd keeps `command/`). Order here is the order in `--help`."""

from __future__ import annotations

from types import ModuleType

from agent.commands import demo, list_cmd, presign, pull, serve, stage, upload_artifacts, verify_cmd

COMMANDS: tuple[ModuleType, ...] = (pull, serve, stage, verify_cmd, list_cmd, presign, upload_artifacts, demo)
