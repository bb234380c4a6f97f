"""Building vLLM's command line and environment, then replacing this process with it (README,
"Serving: the pod's entrypoint").

Pure functions build the argv and the environment, so tests check exactly what vLLM would receive;
`exec_vllm` is the one impure step. After the exec vLLM is the pod's main process: it gets the pod's
signals directly, and nothing of the agent stays in memory.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence

from agent.errors import LaunchError
from agent.settings import STORAGE_SECRETS, Settings

DEFAULT_VLLM_BIN = "vllm"
# Older spellings of the cache location that would otherwise disagree with the cache we filled.
STALE_CACHE_VARS = ("HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")
SECRET_FLAGS = ("--api-key",)  # vLLM flags whose value must not reach a log


def has_flag(args: Sequence[str], flag: str) -> bool:
    """Whether `args` already sets `flag`, as `--flag VALUE` or `--flag=VALUE`."""
    return any(arg == flag or arg.startswith(flag + "=") for arg in args)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The last value `args` gives `flag` (`--flag V`, `--flag=V`, or vLLM's `--flag_name` spelling)."""
    spellings = {flag, "--" + flag[2:].replace("-", "_")}
    value = None
    for index, arg in enumerate(args):
        name, eq, inline = arg.partition("=")
        if name in spellings:
            value = inline if eq else (args[index + 1] if index + 1 < len(args) else None)
    return value


def vllm_argv(model: str, vllm_args: Sequence[str], *, vllm_bin: str = DEFAULT_VLLM_BIN,
              revision: str = "main", commit: str = "", load_format: str | None = None) -> list[str]:
    """`vllm serve MODEL --served-model-name MODEL [--revision COMMIT] [--load-format F] VLLM_ARGS`.

    Without --served-model-name, vLLM offline would name the model after its snapshot path. A revision
    other than main is passed as the commit it resolved to, which the offline cache holds for certain.
    `load_format` is the one the files were chosen for, when the agent was told one. The user's own
    --served-model-name, --revision or --load-format wins.
    """
    argv = [vllm_bin, "serve", model]
    if not has_flag(vllm_args, "--served-model-name"):
        argv += ["--served-model-name", model]
    if revision != "main" and commit and not has_flag(vllm_args, "--revision"):
        argv += ["--revision", commit]
    if load_format and flag_value(vllm_args, "--load-format") is None:
        argv += ["--load-format", load_format]
    return argv + list(vllm_args)


def vllm_env(base: Mapping[str, str], settings: Settings) -> dict[str, str]:
    """The agent's environment, offline, pointed at the filled cache, without the storage secrets."""
    env = {k: v for k, v in base.items() if k not in STORAGE_SECRETS and k not in STALE_CACHE_VARS}
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_HOME"] = str(settings.hf_home)
    env["HF_HUB_CACHE"] = str(settings.hub_cache)
    return env


def resolve_vllm_bin(flag: str | None, settings: Settings, path: str | None = None) -> str:
    """--vllm-bin, else $SIMSWARM_VLLM_BIN, else `vllm`, looked up on `path` (default: $PATH);
    LaunchError when missing."""
    name = flag or settings.vllm_bin or DEFAULT_VLLM_BIN
    found = shutil.which(name, path=path)
    if found is None:
        where = "an executable file" if os.sep in name else "on PATH"
        raise LaunchError(f"the vLLM executable {name!r} is not {where}")
    return found


def redact_argv(argv: Sequence[str]) -> list[str]:
    """argv for the log: the value of a secret flag (`--api-key K`, `--api-key=K`) replaced by ***."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("***")
            hide_next = False
        elif arg in SECRET_FLAGS:
            shown.append(arg)
            hide_next = True
        elif any(arg.startswith(flag + "=") for flag in SECRET_FLAGS):
            shown.append(arg.split("=", 1)[0] + "=***")
        else:
            shown.append(arg)
    return shown


def exec_vllm(argv: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process with vLLM; returns only by raising LaunchError."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Python ignores SIGPIPE and SIGXFSZ for itself; an exec'd program must start with the defaults,
    # as subprocess's restore_signals gives a child.
    for name in ("SIGPIPE", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    try:
        os.execvpe(argv[0], list(argv), dict(env))
    except OSError as exc:
        raise LaunchError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
