"""Whether the vLLM that `serve` will exec can start before its weights have arrived.

It can when its interpreter has vLLM of a supported release and this package's `vllm.general_plugins`
entry point (the plugin must be installed where vLLM runs). The probe reads package metadata only, in
vLLM's own interpreter (found through the executable's `#!` line): it never imports vLLM, so it takes a
fraction of a second, and `serve` runs it while the first files are being fetched.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from agent.serving.release import SUPPORTED_SERIES

ENTRY_POINT = "agent.serving.plugin:register"
PLUGIN_NAME = "simswarm"
PROBE_SECONDS = 30.0
PROBE = f"""
import importlib.metadata as m, json
try:
    version = m.version("vllm")
except m.PackageNotFoundError:
    version = None
plugins = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == {PLUGIN_NAME!r}]
print(json.dumps({{"vllm": version, "plugins": plugins}}))
"""


def interpreter_of(executable: str) -> str | None:
    """The Python that runs `executable` (a console script's `#!` line), or None when it is not one."""
    try:
        with open(executable, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if not words:
        return None
    if Path(words[0]).name == "env" and len(words) > 1:
        words = words[1:]
    return words[0] if Path(words[0]).name.startswith("python") else None


class Probe:
    """Started at once, read later: `why_not()` says why vLLM cannot start early, None when it can."""

    def __init__(self, vllm_bin: str) -> None:
        self.interpreter = interpreter_of(vllm_bin)
        self.proc: subprocess.Popen[str] | None = None
        if self.interpreter is not None:
            try:
                self.proc = subprocess.Popen([self.interpreter, "-I", "-c", PROBE], stdout=subprocess.PIPE,
                                             stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, text=True)
            except OSError:
                self.proc = None

    def close(self) -> None:
        """Leave no probe behind (vLLM, exec'd in this process, would never collect it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def why_not(self) -> str | None:
        if self.proc is None:
            return "the vLLM executable is not a Python console script, so its plugins cannot be checked"
        try:
            stdout, _ = self.proc.communicate(timeout=PROBE_SECONDS)
            found = json.loads(stdout)
        except (subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
            return "vLLM's interpreter did not say which vLLM and plugins it has"
        return judge(found.get("vllm"), found.get("plugins") or [])


def judge(version: str | None, plugins: list[str]) -> str | None:
    if version is None:
        return "vLLM's interpreter has no vllm distribution"
    if not version.startswith(SUPPORTED_SERIES):
        supported = ", ".join(v + "x" for v in SUPPORTED_SERIES)
        return f"vLLM {version} is not a release the plugin supports ({supported})"
    if ENTRY_POINT not in plugins:
        return "simswarm-agent's vLLM plugin is not installed in vLLM's environment"
    return None
