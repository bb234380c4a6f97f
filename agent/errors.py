"""One small error hierarchy. Each error carries its exit code (README "Exit codes") and a one-line hint.

The CLI prints `error: <message> (<hint>)` on one line, so a pod log shows cause and remedy together.
Every failure ends as one of these: `from_os_error` maps the local filesystem's refusals by errno, and
`InternalError` carries whatever nobody foresaw, so no exit status is ever undocumented.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import traceback

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_AVAILABLE = 3
EXIT_VERIFY = 4
EXIT_DISK = 5
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class AgentError(Exception):
    """Base of every error the agent reports to a person. Never carries a secret.

    Subclasses name their code; the base's is 3 (the model could not be delivered), never an
    undocumented 1."""

    exit_code = EXIT_NOT_AVAILABLE
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


class UntrustedCertificateError(ConfigError):
    """The endpoint's TLS certificate does not chain to a trusted CA, names another host, or is out of
    date. Like a wrong secret key, a person must fix it: never retried, never a reason to use the Hub."""

    hint = ("set AWS_CA_BUNDLE to the PEM file of the CA that signed the object storage's certificate; "
            "it wins over SSL_CERT_FILE / SSL_CERT_DIR and the system store")


# What each client says (rustls, OpenSSL through Python's ssl, Go's crypto/x509), as one phrase.
_CERT_PROBLEMS = (
    (re.compile(r"NotValidForName|Hostname mismatch|not valid for|IP SANs|certificate is valid for|"
                r"doesn't match|does not match", re.I), "it was issued for another host name"),
    (re.compile(r"Expired|NotValidYet|not yet valid", re.I), "it is expired or not yet valid"),
    (re.compile(r"self[- ]signed", re.I), "it is self-signed and not trusted"),
    (re.compile(r"UnknownIssuer|unknown authority|local issuer|unable to get issuer|issuer certificate",
                re.I), "it is signed by a CA that is not trusted"),
)
_CERT_FAILURE = re.compile(r"invalid peer certificate|CERTIFICATE_VERIFY_FAILED|x509: |tls: failed to verify|"
                           r"SSLCertVerificationError|certificate verify failed", re.I)


def is_certificate_failure(text: str) -> bool:
    """True when an error's text says the peer's certificate was refused (any of the three TLS stacks)."""
    return bool(_CERT_FAILURE.search(text))


def untrusted_certificate(where: str, detail: str, trust_source: str) -> UntrustedCertificateError:
    """One line: which endpoint, what is wrong with its certificate, and what the agent trusted."""
    problem = next((phrase for pattern, phrase in _CERT_PROBLEMS if pattern.search(detail)), "it was refused")
    return UntrustedCertificateError(f"{where}: the server's TLS certificate is not trusted: {problem} "
                                     f"(trusting {trust_source})")


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


class ResourceLimitError(NotAvailableError):
    """The pod ran out of open files, memory or threads on the bucket path. Not the bucket's fault and
    nothing to repair: the Hub fallback (a few files at a time) may still deliver, so it is allowed."""

    hint = "raise the pod's limits (ulimit -n, memory) or lower --concurrency"


class InternalError(NotAvailableError):
    """A failure nobody foresaw (a bug): reported in one line with its type, never as a traceback."""

    hint = "a bug in simswarm-agent: rerun with --debug for the traceback and report it"


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


class LocalFileError(ConfigError):
    """The local filesystem refused a read or write for a reason a person must fix."""

    hint = "check the path, its permissions and the disk"


class PermissionDeniedError(LocalFileError):
    hint = "the agent's user may not write there: check the folder's owner and mode, or use --hf-home"


class ReadOnlyError(LocalFileError):
    hint = "the path is on a read-only file system: point --hf-home (or the path named) at a writable one"


class ReadOnlyCacheError(ReadOnlyError):
    """The cache cannot be written, and what it holds is not a complete, verified copy to serve as is."""

    hint = "fill the volume from a writable mount first (simswarm-agent pull), or use a writable --hf-home"


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


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_NO_PERMISSION = {errno.EACCES, errno.EPERM}
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN}
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def errno_in_text(text: str) -> int | None:
    """The errno a message names, as Rust (`(os error 24)`) or Python (`[Errno 24]`) print it."""
    match = _OS_ERROR_IN_TEXT.search(text)
    return int(match.group(1) or match.group(2)) if match else None


def open_file_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return "unlimited" if soft == resource.RLIM_INFINITY else str(soft)


def error_for_errno(number: int | None, message: str) -> AgentError:
    """The agent's error for a local OS failure, with a hint that is true for that errno."""
    if number in _DISK_FULL:
        return DiskFullError(message)
    if number == errno.EROFS:
        return ReadOnlyError(message)
    if number in _NO_PERMISSION:
        return PermissionDeniedError(message, hint=f"{PermissionDeniedError.hint} (running as uid "
                                                   f"{os.getuid()})")
    if number in (errno.EMFILE, errno.ENFILE):
        return ResourceLimitError(message, hint=f"raise the pod's open-file limit (ulimit -n, now "
                                                f"{open_file_limit()}) or lower --concurrency")
    if number in _OUT_OF_RESOURCES:
        return ResourceLimitError(message, hint="the pod is short of memory or threads: raise its limits "
                                                "or lower --concurrency")
    return LocalFileError(message)


def from_os_error(exc: OSError, what: str = "") -> AgentError:
    """An OSError as the agent's error: `<what>: <reason>: <file>` in one line, mapped by errno."""
    if isinstance(exc, AgentError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    where = f": {exc.filename}" if exc.filename else ""
    prefix = f"{what}: " if what else ""
    return error_for_errno(exc.errno, f"{prefix}{reason}{where}")


def as_agent_error(exc: Exception) -> AgentError:
    """Any failure as the agent's error: ours as they are, the filesystem's by errno (a person can act
    on its one-line reason), anything else as an internal error naming its type (exit 3, never 1)."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, OSError):
        return from_os_error(exc)
    from agent.store import scrub_queries  # store imports this module

    flat = " ".join(scrub_queries(str(exc)).split())[:300]
    name = type(exc).__name__
    return InternalError(f"unexpected {name}: {flat}" if flat else f"unexpected {name}")


def failure_line(exc: Interrupted | KeyboardInterrupt | Exception, *, debug: bool = False) -> tuple[str, int]:
    """The one line and the documented exit code a command's failure becomes (with `debug`, an
    unexpected failure's traceback first): the CLI's rule, and the background pull's under `serve`."""
    if isinstance(exc, Interrupted):
        return exc.one_line(), exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return "error: interrupted (run the same command again to resume)", EXIT_SIGINT
    if debug:
        traceback.print_exception(exc)
    error = as_agent_error(exc)
    return error.one_line(), error.exit_code
