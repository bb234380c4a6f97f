"""One small error hierarchy. Each error carries its exit code (DESIGN.md §7) and a one-line hint.

The CLI prints `error: <message> (<hint>)` on one line, so a pod log shows cause and remedy together.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_AVAILABLE = 3
EXIT_VERIFY = 4
EXIT_DISK = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class AgentError(Exception):
    """Base of every error the agent reports to a person. Never carries a secret."""

    exit_code = 1
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        text = f"error: {self}"
        return f"{text} ({self.hint})" if self.hint else text


class UsageError(AgentError):
    exit_code = EXIT_USAGE
    hint = "see `simswarm-agent --help`"


class ConfigError(AgentError):
    """A setting is missing or malformed (environment variable or flag)."""

    exit_code = EXIT_USAGE
    hint = "check the MINIO_* / HF_* environment variables"


class CredentialsError(ConfigError):
    hint = "check MINIO_ACCESS_KEY and MINIO_SECRET_KEY"


class UnsafePathError(AgentError, ValueError):
    """A key, path or revision from outside would escape the cache directory."""

    exit_code = EXIT_VERIFY
    hint = "the bucket holds a key that is not a safe relative path; re-stage the model"


class NotAvailableError(AgentError):
    """The model cannot be delivered: not staged, storage off or unreachable, fallback off or failed."""

    exit_code = EXIT_NOT_AVAILABLE
    hint = "stage it with `simswarm-agent stage MODEL`, or allow the Hugging Face fallback"


class StorageUnavailableError(NotAvailableError):
    hint = "check MINIO_ENDPOINT and that the server is up"


class NotFoundError(NotAvailableError, FileNotFoundError):
    """One object or file that should exist does not."""


class VerificationError(AgentError):
    """Bytes, sizes or the manifest do not match and could not be repaired."""

    exit_code = EXIT_VERIFY
    hint = "run `simswarm-agent verify MODEL` for the list of problems, then pull again"


class ManifestError(VerificationError):
    """The snapshot manifest (trees/<commit>.json) or the part sidecar is malformed."""

    hint = "the staged manifest is malformed; re-stage the model with `simswarm-agent stage`"


class DiskFullError(AgentError, OSError):
    exit_code = EXIT_DISK
    hint = "free disk space or point --hf-home at a larger volume"


class Interrupted(BaseException):
    """SIGTERM arrived; what was complete stays, partial parts are kept for resume.

    A BaseException, as KeyboardInterrupt is: libraries that catch every Exception while they wait on
    the network (botocore's endpoint does) must not swallow the signal.
    """

    hint = "run the same command again to resume"

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.exit_code = 128 + signum

    def one_line(self) -> str:
        return f"error: {self} ({self.hint})"


class LaunchError(AgentError):
    exit_code = EXIT_USAGE
    hint = "install vLLM (`pip install simswarm-agent[vllm]`) or set --vllm-bin"
